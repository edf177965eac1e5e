"""Import-time messages of optional libraries that say nothing to a user of this project, dropped at the
logger that emits them (only these messages; everything else those loggers say still shows):

* torchao registers enums as pytree constants, which torch >= 2.14 reports as deprecated on every import;
* diffusers imports torchao's tensor classes when torchao is installed and warns when one is missing
  (it matters only for loading torchao-serialized checkpoints, which this project never does).
"""
from __future__ import annotations

import logging

_DROPPED = {
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    """Attach the filters (idempotent)."""
    for name, text in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


install()
