"""Exact conv input factor A of K-FAC-expand from shifted-window cross-products, without unfolding.

Why: A = Σ_{n,t} ā āᵀ over unfolded kh×kw patches costs (C·kh·kw)²/2 multiply-adds per output position,
and that GEMM dominated the K-FAC pass. But the (k, l) kernel-offset block of A,
Σ_t x[pos_k(t)] x[pos_l(t)]ᵀ, is a cross-product of the input with a copy of itself shifted by
δ = dilation·(k − l), summed over the input positions that offset l reads. So each spatial axis is cut
into segments on which (a) the set of offsets reading a position and (b) whether each δ-shifted read is
real input or padding are constant. For every cell (segment_h × segment_w) one GEMM takes the
cross-products of the cell's inputs with all their (real) δ-shifted copies at once, and each block of A
is the sum of the cells its offset reads. For a stride-1 3×3 conv that is at most 13 distinct δ instead
of 45 C×C blocks, and the zero padding is never multiplied. Nothing is approximated: the cells tile
exactly the positions each block sums over. A strided conv is handled per residue class of the input
lattice that an offset reads.

The per-cell sums are the pass's state (plain sums, so checkpointing and all-reduce work on them
unchanged); A is assembled once, in :meth:`ConvFactorPlan.assemble`. The price is memory: the sums take
1-2.5× the size of A (1.77× for a padded 3×3 conv); plans that would take more fall back to unfolding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ModelError

#: Batch chunks keep each cell's stacked shifted copies about this large, so the GEMM reads them from cache
#: right after the copy writes them (2× faster than one whole-batch copy on a 2 MB-L2 CPU).
_CHUNK_BYTES = 2 << 20

#: Below this many input channels the per-cell GEMMs are too thin to beat one big unfold GEMM.
MIN_CHANNELS = 16

#: Largest state (in C×C blocks) a plan may keep, relative to the (kh·kw)² blocks of A itself.
MAX_STATE_RATIO = 2.5


@dataclass(frozen=True)
class _Axis:
    """One spatial axis: input size ``n`` (after explicit non-zero padding), output size ``o``, kernel ``k``,
    dilation ``d``, stride ``s`` and the zero padding ``p`` before the first input."""

    n: int
    o: int
    k: int
    d: int
    s: int
    p: int

    def residue(self, off: int) -> int:
        """Residue class (mod stride) of the input positions that kernel offset ``off`` reads."""
        return (off * self.d - self.p) % self.s

    def span(self, off: int) -> tuple[int, int]:
        """Lattice indices j (input r + s·j) of the real inputs that offset ``off`` reads: [lo, hi)."""
        r = self.residue(off)
        j0 = (off * self.d - self.p - r) // self.s
        top = -(-(self.n - r) // self.s)
        return max(j0, 0), min(j0 + self.o, top)

    def outputs(self, off: int) -> tuple[int, int]:
        """Output indices t whose tap at offset ``off`` is a real input (not padding): [lo, hi)."""
        lo, hi = self.span(off)
        shift = (off * self.d - self.p - self.residue(off)) // self.s
        return lo - shift, hi - shift

    def reads(self, seg: tuple[int, int], r: int, delta: int) -> bool:
        """Whether lattice segment ``seg`` of class ``r`` shifted by ``delta`` reads real input."""
        return r + self.s * seg[0] + delta >= 0 and r + self.s * (seg[1] - 1) + delta < self.n

    def segments(self, offsets: list[int], r: int, deltas: set[int]) -> list[tuple[int, int]]:
        """Cut class ``r``'s lattice so that each segment is inside or outside every offset's span, and each
        δ-shifted read of it is all real input or all padding."""
        spans = [self.span(off) for off in offsets]
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        cuts = {e for span in spans for e in span}
        cuts |= {-(-(edge - r - delta) // self.s) for delta in deltas for edge in (0, self.n)}
        ordered = sorted(c for c in cuts if lo <= c <= hi)
        return [(a, b) for a, b in itertools.pairwise(ordered) if any(x <= a and b <= y for x, y in spans)]


@dataclass
class _Cell:
    """A rectangle of one class's lattice: its segments, its δ shifts ((0, 0) first) and where its
    C×C row blocks start in the class's state."""

    h: tuple[int, int]
    w: tuple[int, int]
    deltas: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    start: int = 0


@dataclass
class _Class:
    """The kernel offsets whose inputs lie on one residue class (r_h, r_w) of the input lattice."""

    residue: tuple[int, int]
    cells: list[_Cell]
    blocks: int = 0  # C×C row blocks of its state: Σ over cells of len(deltas)


@dataclass
class _Pair:
    """Block (row, col) of A (flat kernel offsets; row's channels index rows): the sum of the C×C row
    blocks ``parts`` of its class's state; ``cells`` are the cells whose inputs col reads (for the bias)."""

    row: int
    col: int
    cls: int
    parts: list[int]
    cells: list[int]


class ConvFactorPlan:
    """How to accumulate the input factor of one Conv2d (groups == 1) for one input size, and assemble it.

    Build with :func:`conv_factor_plan`; :meth:`state` gives the zeroed sums, :meth:`accumulate` adds one
    batch, :meth:`assemble` returns A in the column order of ``conv.weight.reshape(out, -1)`` with the bias
    (when ``bias``) as the last row and column.
    """

    def __init__(self, conv: nn.Conv2d, hw: tuple[int, int], bias: bool) -> None:
        self.conv = conv
        self.hw = hw
        self.bias = bias
        self.channels = conv.in_channels
        self.explicit = _explicit_padding(conv)
        zero_pads = _zero_padding(conv)
        axes = []
        for i in range(2):
            n = hw[i] + (self.explicit[2 - 2 * i] + self.explicit[3 - 2 * i] if self.explicit else 0)
            lo, hi = zero_pads[i]
            span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            o = (n + lo + hi - span) // conv.stride[i] + 1
            axes.append(_Axis(n, o, conv.kernel_size[i], conv.dilation[i], conv.stride[i], lo))
        self.axes: tuple[_Axis, _Axis] = (axes[0], axes[1])
        self.positions = axes[0].o * axes[1].o
        self.classes: list[_Class] = []
        self.pairs: list[_Pair] = []
        self._build()

    # -- plan ---------------------------------------------------------------------------------------
    def _build(self) -> None:
        ah, aw = self.axes
        offsets = [(i, j) for i in range(ah.k) for j in range(aw.k)]
        index: dict[tuple[int, int], int] = {}
        for i, j in offsets:
            index.setdefault((ah.residue(i), aw.residue(j)), len(index))
        # each unordered pair of offsets once, oriented so that its (class, δ) is shared where possible
        used: list[set[tuple[int, int]]] = [set() for _ in index]
        chosen: list[tuple[int, int, int, tuple[int, int]]] = []
        for a in range(len(offsets)):
            for b in range(a + 1):
                options = [(u, v, index[(ah.residue(offsets[v][0]), aw.residue(offsets[v][1]))],
                            self._delta(offsets[u], offsets[v])) for u, v in ((a, b), (b, a))]
                u, v, ci, delta = next((o for o in options if o[3] in used[o[2]]), options[0])
                (uh, uw), (vh, vw) = offsets[u], offsets[v]
                if all(max(x.outputs(e)[0], x.outputs(f)[0]) < min(x.outputs(e)[1], x.outputs(f)[1])
                       for x, e, f in ((ah, uh, vh), (aw, uw, vw))):  # else the taps never both see real input
                    used[ci].add(delta)
                    chosen.append((u, v, ci, delta))
        for key, ci in index.items():
            segs = [ax.segments([o for o in range(ax.k) if ax.residue(o) == key[i]], key[i],
                                {dl[i] for dl in used[ci]}) for i, ax in enumerate(self.axes)]
            self.classes.append(_Class(key, [_Cell(sh, sw) for sh in segs[0] for sw in segs[1]]))
        found: list[tuple[list[tuple[int, tuple[int, int]]], list[int]]] = []
        for _, v, ci, delta in chosen:
            cls, (vh, vw) = self.classes[ci], offsets[v]
            (h0, h1), (w0, w1) = ah.span(vh), aw.span(vw)
            mine, read = [], []
            for c, cell in enumerate(cls.cells):
                if not (h0 <= cell.h[0] and cell.h[1] <= h1 and w0 <= cell.w[0] and cell.w[1] <= w1):
                    continue
                read.append(c)
                if ah.reads(cell.h, cls.residue[0], delta[0]) and aw.reads(cell.w, cls.residue[1], delta[1]):
                    if delta not in cell.deltas:
                        cell.deltas.append(delta)
                    mine.append((c, delta))
            found.append((mine, read))
        for cls in self.classes:
            for cell in cls.cells:
                cell.start, cls.blocks = cls.blocks, cls.blocks + len(cell.deltas)
        for (u, v, ci, _), (mine, read) in zip(chosen, found, strict=True):
            cells = self.classes[ci].cells
            parts = [cells[c].start + cells[c].deltas.index(delta) for c, delta in mine]
            self.pairs.append(_Pair(row=offsets[u][0] * aw.k + offsets[u][1], col=offsets[v][0] * aw.k + offsets[v][1],
                                    cls=ci, parts=parts, cells=read))

    def _delta(self, row: tuple[int, int], col: tuple[int, int]) -> tuple[int, int]:
        return self.axes[0].d * (row[0] - col[0]), self.axes[1].d * (row[1] - col[1])

    # -- pass ---------------------------------------------------------------------------------------
    def state(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Zeroed sums: per class its cells' cross-products stacked, (blocks·C, C); with a bias also the
        cells' column sums, (cells, C)."""
        c = self.channels
        out = {}
        for i, cls in enumerate(self.classes):
            out[f"cells{i}"] = torch.zeros(cls.blocks * c, c, dtype=dtype, device=device)
            if self.bias:
                out[f"sums{i}"] = torch.zeros(len(cls.cells), c, dtype=dtype, device=device)
        return out

    def accumulate(self, x: Tensor, state: dict[str, Tensor]) -> None:
        """Add one batch of conv inputs ``x`` (B, C, H, W) to ``state``: one copy and one GEMM per cell
        (per batch chunk)."""
        if tuple(x.shape[2:]) != self.hw:
            raise ModelError(f"conv input of spatial size {tuple(x.shape[2:])} after a probe saw {self.hw}; kfac "
                             "needs each conv's input size fixed within a pass (same input shape for every batch)")
        if self.explicit:
            x = F.pad(x, self.explicit, mode=self.conv.padding_mode)
        c = self.channels
        xp = x.permute(0, 2, 3, 1)  # channels last (a free view when x is channels_last)
        ah, aw = self.axes
        for i, cls in enumerate(self.classes):
            acc, sums = state[f"cells{i}"], state.get(f"sums{i}")
            rh, rw = cls.residue
            for j, cell in enumerate(cls.cells):
                (h0, h1), (w0, w1) = cell.h, cell.w
                hs, ws = rh + ah.s * h0, rw + aw.s * w0
                he, we = hs + ah.s * (h1 - h0 - 1) + 1, ws + aw.s * (w1 - w0 - 1) + 1
                out = acc[cell.start * c:(cell.start + len(cell.deltas)) * c]
                per_image = (h1 - h0) * (w1 - w0) * len(cell.deltas) * c * x.element_size()
                chunk = x.shape[0] if x.is_cuda else max(1, _CHUNK_BYTES // per_image)  # GPUs: fewer launches
                for b0 in range(0, x.shape[0], chunk):
                    parts = [xp[b0:b0 + chunk, hs + dh:he + dh:ah.s, ws + dw:we + dw:aw.s] for dh, dw in cell.deltas]
                    y = torch.cat(parts, dim=3) if len(parts) > 1 else parts[0].contiguous()
                    y = y.view(-1, len(parts) * c)
                    out.addmm_(y.T, y[:, :c])
                    if sums is not None:
                        sums[j] += y[:, :c].sum(dim=0)

    def assemble(self, state: dict[str, Tensor], count: Tensor) -> Tensor:
        """A from the summed cells: (C·kh·kw [+1])², columns in (channel, kh, kw) order, bias last.

        Written one kernel-offset row at a time through a (C, kh·kw, C) buffer whose transposed copy into A
        moves contiguous runs: A is the largest tensor of the pass.
        """
        c = self.channels
        kk = self.axes[0].k * self.axes[1].k
        ref = state["cells0"]
        d = c * kk
        a = ref.new_empty(d + int(self.bias), d + int(self.bias))
        view = a[:d, :d].view(c, kk, c, kk)
        buf, scratch = ref.new_empty(c, kk, c), ref.new_empty(c, c)
        by_row: list[list[_Pair]] = [[] for _ in range(kk)]
        for pair in self.pairs:
            by_row[pair.row].append(pair)
            if pair.col != pair.row:
                by_row[pair.col].append(pair)
        for r in range(kk):
            empty = set(range(kk))
            for pair in by_row[r]:
                blocks = state[f"cells{pair.cls}"].view(-1, c, c)
                other = pair.col if pair.row == r else pair.row
                empty.discard(other)
                if pair.row == pair.col:
                    blk = _sum_blocks(blocks, pair.parts, scratch)
                    torch.add(blk, blk.T, out=buf[:, r]).mul_(0.5)
                elif pair.row == r:
                    _sum_blocks(blocks, pair.parts, buf[:, other], copy=True)
                else:
                    buf[:, other] = _sum_blocks(blocks, pair.parts, scratch).T
            for other in empty:
                buf[:, other].zero_()
            view[:, r].copy_(buf.permute(0, 2, 1))
        if self.bias:
            sums = ref.new_zeros(kk, c)
            for pair in self.pairs:
                if pair.row == pair.col:
                    sums[pair.row] = state[f"sums{pair.cls}"][pair.cells].sum(dim=0)
            vec = sums.T.reshape(-1)
            a[d, :d] = vec
            a[:d, d] = vec
            a[d, d] = count.to(a.dtype)
        return a


def _sum_blocks(blocks: Tensor, parts: list[int], out: Tensor, copy: bool = False) -> Tensor:
    """Σ blocks[parts] by in-place adds into ``out`` (no gathered copy); a view of the one block if
    there is only one and ``copy`` is False."""
    if len(parts) == 1:
        return out.copy_(blocks[parts[0]]) if copy else blocks[parts[0]]
    torch.add(blocks[parts[0]], blocks[parts[1]], out=out)
    for p in parts[2:]:
        out.add_(blocks[p])
    return out


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """Padding that must be applied as a copy (non-zero modes); () when it is all implicit zeros."""
    if conv.padding_mode != "zeros":
        return tuple(conv._reversed_padding_repeated_twice)
    return ()


def _zero_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """Zero padding (before, after) per axis, never materialised (asymmetric for some padding="same")."""
    if conv.padding_mode != "zeros":
        return (0, 0), (0, 0)
    rev = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    return (rev[2], rev[3]), (rev[0], rev[1])


def conv_factor_plan(conv: nn.Module, hw: tuple[int, int] | None, bias: bool) -> ConvFactorPlan | None:
    """A plan for ``conv`` when the shifted-window method pays (kernel > 1×1, C ≥ MIN_CHANNELS, state at most
    MAX_STATE_RATIO × A), else None: the caller then unfolds."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or hw is None:
        return None
    if conv.in_channels < MIN_CHANNELS or conv.kernel_size == (1, 1):
        return None
    plan = ConvFactorPlan(conv, hw, bias)
    blocks = sum(cls.blocks for cls in plan.classes)
    return plan if blocks <= MAX_STATE_RATIO * (conv.kernel_size[0] * conv.kernel_size[1]) ** 2 else None
