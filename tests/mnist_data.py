"""Whether the MNIST t10k files are here (``QUA2SEDIMO_MNIST`` or ``QUA2SEDIMO_DATA``): the marker of the tests
that read real digits (imported by its bare name, like the other helper modules of tests/)."""
import pytest

from multiquant.mnist import data
from multiquant.paths import constants

HAVE_MNIST = constants.MNIST_DIR is not None and all((constants.MNIST_DIR / f).is_file()
                                                     for f in (data.IMAGE_FILE, data.LABEL_FILE))
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST test set not found in {constants.MNIST_DIR} "
                                                        "(set QUA2SEDIMO_MNIST)")
