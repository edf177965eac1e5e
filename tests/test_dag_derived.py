"""DAG blocks, op labels and units of a plain-module U-Net without naming rules (names unlike diffusers')."""
from __future__ import annotations

import torch
from torch import nn

from autobuild.dag import build_dag, units
from multiquant.families import FamilySpec


class Res(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.temb_proj, self.cond_proj = nn.Linear(emb, cout), nn.Linear(emb, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t, c):
        h = self.conv1(torch.relu(x)) + self.temb_proj(t)[:, :, None, None] + self.cond_proj(c)[:, :, None, None]
        return self.shortcut(x) + self.conv2(torch.relu(h))


class SelfAttention(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, ch, hh, ww = x.shape
        q, k, v = (f(x).flatten(2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q.transpose(1, 2) @ k / ch ** 0.5, dim=-1)
        return x + self.out((v @ a.transpose(1, 2)).reshape(b, ch, hh, ww))


class CustomUNet(nn.Module):
    def __init__(self, ch=8, emb=16):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(1, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(4, emb)
        self.stem = nn.Conv2d(1, ch, 3, padding=1)
        self.enc1, self.enc2 = Res(ch, ch, emb), Res(ch, 2 * ch, emb)
        self.down = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.bottleneck, self.attn = Res(2 * ch, 2 * ch, emb), SelfAttention(2 * ch)
        self.dec1, self.dec2 = Res(4 * ch, ch, emb), Res(2 * ch, ch, emb)
        self.head = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, t, y):
        t, c = self.time_mlp(t[:, None] / 1000), self.class_emb(y)
        h0 = self.stem(x)
        h1 = self.enc1(h0, t, c)
        h2 = self.enc2(h1, t, c)
        m = self.attn(self.bottleneck(self.down(h2), t, c))
        up = nn.functional.interpolate(m, scale_factor=2)
        d1 = self.dec1(torch.cat([up, h2], 1), t, c)
        return self.head(self.dec2(torch.cat([d1, h1], 1), t, c))


FAMILY = FamilySpec(name="custom_unet", factory=lambda size: CustomUNet(), fp_prec=32, resolution=8,
                    example_inputs=lambda m, n: {"x": torch.randn(n, 1, 8, 8), "t": torch.rand(n) * 999,
                                                 "y": torch.arange(n) % 4})


def _graph():
    torch.manual_seed(0)
    return build_dag(FAMILY.build("tiny"), FAMILY)


def _layers(graph):
    return {a["path"]: a for _, a in graph.nodes(data=True) if a["kind"] == "layer"}


def test_blocks_follow_the_module_tree_in_execution_order():
    layers = _layers(_graph())
    block = {p: a["block"] for p, a in layers.items()}
    for path in ("time_mlp.0", "time_mlp.2", "stem", "head"):
        assert block[path] == -1, path  # global layers
    order = ["enc1", "enc2", "down", "bottleneck", "attn", "dec1", "dec2"]
    first = [min(b for p, b in block.items() if p.split(".")[0] == name) for name in order]
    assert first == list(range(len(order)))  # one block per top-level sub-module, numbered as they run
    assert all(len({b for p, b in block.items() if p.split(".")[0] == name}) == 1 for name in order)


def test_op_labels_come_from_names_and_classes():
    ops = {p: a["op"] for p, a in _layers(_graph()).items()}
    assert ops["time_mlp.0"] == ops["time_mlp.2"] == "t-Embed"
    assert ops["stem"] == "Conv-In" and ops["head"] == "Conv-Out" and ops["down"] == "Down"
    assert ops["enc1.conv1"] == "Res-In" and ops["enc1.conv2"] == "Res-Out" and ops["enc2.shortcut"] == "Res-Skip"
    assert ops["enc1.temb_proj"] == "Res-tEmb" and ops["enc1.cond_proj"] == "Res-cEmb"
    assert (ops["attn.q"], ops["attn.k"], ops["attn.v"], ops["attn.out"]) == ("SA-Q", "SA-K", "SA-V", "SA-Out")
    assert "Linear" not in ops.values() and "Conv" not in ops.values()


def test_block_units_keep_the_time_mlp_apart_and_name_their_types():
    graph = _graph()
    found = units(graph, "block")
    paths = {u.name: sorted(graph.nodes[n]["path"] for n in u.layers) for u in found}
    t_units = [u for u in found if u.type == "t-Embed"]
    assert len(t_units) == 1 and paths[t_units[0].name] == ["time_mlp.0", "time_mlp.2"]
    assert t_units[0].block == -1
    types = {u.type for u in found}
    assert {"ResBlk", "Self-Attn", "Conv In", "Conv Out"} <= types and "Other" not in types
    by_block = {}
    for u in found:
        by_block.setdefault(u.block, set()).update(graph.nodes[n]["path"].split(".")[0] for n in u.layers)
    assert all(len(names) == 1 or block == -1 for block, names in by_block.items()), by_block
