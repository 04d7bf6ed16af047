"""Layout operations: how Hugging Face tensors become GGUF tensors, and what that does to LoRA factors.

Every tensor is seen as a stack of matrices: a 1-D tensor (n,) is one (n, 1) matrix, a 2-D one
is itself, a 3-D expert tensor (E, a, b) is E matrices (a, b). A layout operation says, for
each output tensor, which source matrix each output matrix is cut from and how, as a
:class:`View`: optionally transposed, then a selection of rows (a slice or a permutation) and of
columns. That one description serves everything:

- the base tensor: ``view.apply(matrix)``, or a tile of output rows at a time (:meth:`View.source_rows`);
- the LoRA delta ``left @ right`` (in the source matrix's orientation): ``view.factors(left, right)``
  gives the factors of the output matrix's delta. A row selection (a rotary q/k permute, a fused
  gate/up de-interleave) selects rows of ``left`` and shares ``right``; a transpose swaps the two
  roles; a column selection selects columns of ``right``. The merge (merge.py) and the GGUF LoRA
  adapter export use the same factors;
- an elementwise constant (norms a family stores as ``w + 1``): :attr:`Output.add`, which leaves the
  LoRA factors alone.

Operations are small frozen objects; a family module lists them per tensor name
(arch/*.py). Config-dependent numbers (head counts) are read when the plan binds the op to a
config (:meth:`LayoutOp.outputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError

@dataclass(frozen=True)
class Span:
    """A slice as a hashable value (slices are not hashable before Python 3.12)."""

    start: int | None = None
    stop: int | None = None
    step: int | None = None

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop, self.step)


#: a selection of rows or columns: a span, or an explicit order of indices (a permutation)
Index = Span | tuple[int, ...]

ALL = Span()


def index_array(index: Index) -> np.ndarray | slice:
    """An Index as numpy indexing takes it."""
    return index.slice if isinstance(index, Span) else np.asarray(index, dtype=np.intp)


def _count(index: Index, n: int) -> int:
    return len(range(n)[index.slice]) if isinstance(index, Span) else len(index)


def _sub(index: Index, n: int, part: slice) -> Index:
    """index[part] as an Index (the output rows part.start..part.stop of a selection)."""
    if isinstance(index, Span):
        r = range(n)[index.slice][part]
        return Span(r.start, r.stop, r.step if r.step != 1 else None)
    return tuple(index[part])


@dataclass(frozen=True)
class View:
    """One output matrix from one source matrix: ``transpose`` it (or not), then keep ``rows``
    and ``cols`` of the result (output row i is row ``rows[i]`` of the possibly transposed matrix)."""

    transpose: bool = False
    rows: Index = ALL
    cols: Index = ALL

    def shape(self, src: tuple[int, int]) -> tuple[int, int]:
        r, c = (src[1], src[0]) if self.transpose else src
        return _count(self.rows, r), _count(self.cols, c)

    def apply(self, m: np.ndarray) -> np.ndarray:
        """The output matrix of a whole source matrix (any dtype: values or stored bits)."""
        x = m.T if self.transpose else m
        x = x[index_array(self.rows)]
        if self.cols != ALL:
            x = x[:, index_array(self.cols)]
        return np.ascontiguousarray(x)

    def source_rows(self, src: tuple[int, int], out_rows: slice) -> "View":
        """The view restricted to output rows ``out_rows`` (for tiles)."""
        r = src[1] if self.transpose else src[0]
        return View(self.transpose, _sub(self.rows, r, out_rows), self.cols)

    def row_span(self, src: tuple[int, int]) -> tuple[int, int]:
        """(first, last + 1) of the source rows a non-transposed view reads."""
        if self.transpose:
            return 0, src[0]
        if isinstance(self.rows, Span):
            r = range(src[0])[self.rows.slice]
            return (min(r[0], r[-1]), max(r[0], r[-1]) + 1) if len(r) else (0, 0)
        return (min(self.rows), max(self.rows) + 1) if self.rows else (0, 0)

    def shifted(self, first: int) -> "View":
        """The same view on the source rows from ``first`` on (a non-transposed view's region)."""
        if self.transpose or not first:
            return self
        if isinstance(self.rows, Span):
            start, stop, step = self.rows.start or 0, self.rows.stop, self.rows.step
            return View(False, Span(start - first, None if stop is None else max(stop - first, 0), step), self.cols)
        return View(False, tuple(i - first for i in self.rows), self.cols)

    def factors(self, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Factors of the output matrix's delta from those of the source's (delta = left @ right)."""
        if self.transpose:  # (L @ R)^T = R^T @ L^T
            left, right = right.T, left.T
        left = left[index_array(self.rows)]
        if self.cols != ALL:
            right = right[:, index_array(self.cols)]
        return np.ascontiguousarray(left), np.ascontiguousarray(right)

    @property
    def is_identity(self) -> bool:
        return not self.transpose and self.rows == ALL and self.cols == ALL


@dataclass(frozen=True)
class Part:
    """Output matrix ``i`` of an output tensor comes from matrix ``matrix`` of input ``input``."""

    input: int
    matrix: int
    view: View


@dataclass(frozen=True)
class Output:
    """One GGUF tensor an operation makes: its shape (numpy order) and, per output matrix, its Part."""

    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    add: float = 0.0  # a constant added to every element after the merge (norms stored as w + 1)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The shape of each matrix of a tensor: (n,) -> (n, 1); (a, b) and (E, a, b) -> (a, b)."""
    if len(shape) == 1:
        return int(shape[0]), 1
    if len(shape) in (2, 3):
        return int(shape[-2]), int(shape[-1])
    raise InputError(f"a tensor of shape {tuple(shape)} is not a vector, matrix or stack of matrices")


def _matrix(x: np.ndarray, e: int) -> np.ndarray:
    return x[e] if x.ndim == 3 else x.reshape(-1, 1) if x.ndim == 1 else x


def matrix_count(shape: Sequence[int]) -> int:
    return int(shape[0]) if len(shape) == 3 else 1


def tensor_shape(like: Sequence[int], n_matrices: int, m: tuple[int, int]) -> tuple[int, ...]:
    """The tensor shape of ``n_matrices`` matrices ``m`` in the form of a source tensor shaped ``like``."""
    if len(like) == 1:
        return (m[0],)
    if len(like) == 2:
        return m
    return (n_matrices, *m)


class LayoutOp:
    """Base of the layout operations: one input (``inputs`` more for stacks), views per output."""

    #: how many GGUF tensors the operation makes (the family's rule names them)
    n_outputs: int = 1

    def views(self, config: Mapping, src: tuple[int, int]) -> tuple[View, ...]:
        """One View per output, for a source matrix of shape ``src``."""
        return (View(),)

    def outputs(self, config: Mapping, shapes: Sequence[tuple[int, ...]]) -> tuple[Output, ...]:
        if len(shapes) != 1:
            raise InputError(f"{type(self).__name__} takes one tensor, got {len(shapes)}")
        shape = tuple(shapes[0])
        src = matrix_shape(shape)
        n = matrix_count(shape)
        outs = []
        for view in self.views(config, src):
            outs.append(Output(tensor_shape(shape, n, view.shape(src)),
                               tuple(Part(0, e, view) for e in range(n)), self.add))
        return tuple(outs)

    add: float = 0.0

    def apply(self, config: Mapping, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output of a whole source tensor (values or stored bits), for tests and small tensors."""
        out = []
        for o in self.outputs(config, [x.shape]):
            mats = [p.view.apply(_matrix(x, p.matrix)) for p in o.parts]
            arr = np.stack(mats) if len(x.shape) == 3 else mats[0]
            out.append(np.ascontiguousarray(arr.reshape(o.shape)) + o.add if o.add else arr.reshape(o.shape))
        return tuple(out)

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Copy(LayoutOp):
    """The tensor as it is (a rename)."""


@dataclass(frozen=True)
class Transpose(LayoutOp):
    """Each matrix transposed: HF experts stored (E, in, out) -> GGUF's (E, out, in)."""

    def views(self, config, src):
        return (View(transpose=True),)


@dataclass(frozen=True)
class Split(LayoutOp):
    """A fused tensor split in ``parts`` along the rows (after an optional transpose) or the
    columns of each matrix, either interleaved (part j is every parts-th row starting at j, as
    some fused expert layouts store gate and up) or in consecutive halves (fused gate_up projections)."""

    parts: int = 2
    interleaved: bool = True
    transpose: bool = False
    axis: str = "rows"  # "rows" or "cols" of the (transposed) matrix

    @property
    def n_outputs(self) -> int:  # type: ignore[override]
        return self.parts

    def views(self, config, src):
        r, c = (src[1], src[0]) if self.transpose else src
        n = r if self.axis == "rows" else c
        if n % self.parts:
            raise InputError(f"cannot split {n} {self.axis} into {self.parts} equal parts")
        step = n // self.parts
        sels = [Span(j, None, self.parts) if self.interleaved else Span(j * step, (j + 1) * step)
                for j in range(self.parts)]
        if self.axis == "rows":
            return tuple(View(self.transpose, rows=s) for s in sels)
        return tuple(View(self.transpose, cols=s) for s in sels)


def rope_permutation(n_rows: int, n_head: int) -> tuple[int, ...]:
    """Row order of llama.cpp's rotary layout for one q or k projection: within each head the
    rows (2, head_dim/2) are swapped to (head_dim/2, 2), i.e. output row ``h*d + 2*i + j`` is
    source row ``h*d + j*d/2 + i`` (d = head_dim). The LoRA delta gets the same row order."""
    if n_head <= 0 or n_rows % (2 * n_head):
        raise InputError(f"cannot permute {n_rows} rows for {n_head} rotary heads (rows must be a multiple of 2 * heads)")
    half = n_rows // n_head // 2
    idx = np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)
    return tuple(int(i) for i in idx)


@dataclass(frozen=True)
class PermuteHeads(LayoutOp):
    """llama.cpp's rotary row order for q_proj / k_proj (weights and biases) of the families whose
    GGUF architecture rotates pairs (i, i + d/2) as adjacent rows: heads read from the config keys
    ``heads`` (and ``kv_heads`` when they differ)."""

    heads: str = "num_attention_heads"
    kv_heads: str | None = None

    def n_head(self, config: Mapping) -> int:
        n = int(config[self.heads])
        if self.kv_heads is not None and config.get(self.kv_heads) is not None:
            n = int(config[self.kv_heads])
        return n

    def views(self, config, src):
        return (View(rows=rope_permutation(src[0], self.n_head(config))),)

    def describe(self) -> str:
        return f"PermuteHeads({self.kv_heads or self.heads})"


@dataclass(frozen=True)
class AddOne(LayoutOp):
    """The tensor plus one (RMSNorm weights that llama.cpp stores as w + 1 for some families)."""

    add: float = 1.0


def packed_rows(view: View) -> Index:
    """--keep-mxfp4: ggml MXFP4 blocks of an expert are stored output-major, so the output
    matrix of a transposed view with all columns is a row selection of the packed blocks."""
    if not view.transpose or view.cols != ALL:
        raise InputError("MXFP4 blocks can only be kept for transposed expert layouts")
    return view.rows


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
