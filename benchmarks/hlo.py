"""The anatomy of each implementation's compiled program: kernels, passes over memory, full-size temporaries.

  python -m benchmarks.hlo [--shape 65536,256] [--dtype float32] [--only NAMES] [--prototypes] [--dump DIR]

For the op benchmark's implementations (and, with --prototypes, the alternative formulations in
`benchmarks.prototypes`) this compiles the very functions `benchmarks.ops` times, reads the optimised HLO of the
entry computation (`jax.jit(f).lower(...).compile().as_text()`) and counts, per top-level kernel (a fusion, a
custom YNNPACK fusion, a copy, ...), the bytes it reads and writes in arrays at least as large as x. Summed
and divided by x's size in bytes this is the number of x-sized passes over memory the program makes, to
compare with the floor's 2 (forward) and 5 (forward+backward). Full-size buffers that are neither an input
nor an output are temporaries (residuals of the backward, intermediates XLA did not fuse away); each costs
its own writes and reads and, on first touch of freshly mapped memory, one minor page fault per 4 KiB page.
"""

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence

from benchmarks import _harness
from benchmarks import ops

_ITEMSIZE = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
}
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


@dataclasses.dataclass
class Kernel:
  name: str
  opcode: str  # fusion, copy, ...
  kind: str  # kLoop / kInput / kOutput / ynn (YNNPACK custom fusion) / ""
  op_name: str  # the JAX operation the kernel came from (metadata)
  big_read_bytes: int
  big_write_bytes: int


@dataclasses.dataclass
class Anatomy:
  kernels: list[Kernel]
  passes: float  # (big reads + big writes) / x bytes
  temporaries: list[str]  # full-size buffers that are neither inputs nor outputs


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _SHAPE.findall(text)]


def _nbytes(shapes, big_elements: int) -> int:
  return sum(_ITEMSIZE[dtype] * math.prod(dims) for dtype, dims in shapes if math.prod(dims) >= big_elements)


def _split_instruction(line: str):
  """'%name = SHAPE opcode(operands), attrs' -> (name, shape text, opcode, operand text, attrs)."""
  match = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+) = ", line)
  if not match:
    return None
  rest = line[match.end() :]
  if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
    depth = 0
    for i, char in enumerate(rest):  # noqa: B007  (i is the split point, read after the loop)
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    shape, rest = rest[: i + 1], rest[i + 1 :].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  opcode, _, rest = rest.partition("(")
  depth, i = 1, 0
  while depth and i < len(rest):
    depth += {"(": 1, ")": -1}.get(rest[i], 0)
    i += 1
  return match.group(1), shape, opcode.strip(), rest[: i - 1], rest[i:]


def anatomy(hlo_text: str, x_elements: int, x_itemsize: int) -> Anatomy:
  """Counts the x-sized memory traffic of the ENTRY computation of an optimised HLO module."""
  entry = hlo_text[hlo_text.index("\nENTRY") :]
  entry = entry[: entry.index("\n}") + 1]
  shapes, kernels, root_operands, params = {}, [], set(), set()
  for line in entry.splitlines()[1:]:
    parsed = _split_instruction(line)
    if parsed is None:
      continue
    name, shape, opcode, operands, attrs = parsed
    shapes[name] = _shapes(shape)
    operand_names = re.findall(r"%([\w.\-]+)", operands)
    if opcode == "parameter":
      params.add(name)
    if line.lstrip().startswith("ROOT"):
      root_operands = set(operand_names) if opcode == "tuple" else {name}
    if opcode in _FREE:
      continue
    kind = re.search(r"kind=(\w+)", attrs)
    kind = kind.group(1) if kind else ""
    if "__ynn_fusion" in attrs:
      kind = "ynn"
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    reads = sum(_nbytes(shapes.get(o, []), x_elements) for o in dict.fromkeys(operand_names))
    kernels.append(
      Kernel(
        name=name,
        opcode=opcode,
        kind=kind,
        op_name=op_name.group(1) if op_name else "",
        big_read_bytes=reads,
        big_write_bytes=_nbytes(shapes[name], x_elements),
      )
    )
  x_bytes = x_elements * x_itemsize
  # A conditional's branches run only when taken: listed, but left out of the pass count.
  passes = sum(k.big_read_bytes + k.big_write_bytes for k in kernels if k.opcode != "conditional") / x_bytes
  temporaries = [k.name for k in kernels if k.big_write_bytes and k.name not in root_operands]
  return Anatomy(kernels=kernels, passes=passes, temporaries=temporaries)


def describe(name: str, mode: str, result: Anatomy, x_bytes: int) -> str:
  lines = [
    f"{name} [{mode}]: {len(result.kernels)} kernels, {result.passes:.1f} x-sized passes, "
    f"{len(result.temporaries)} full-size temporaries"
  ]
  for kernel in result.kernels:
    if kernel.big_read_bytes or kernel.big_write_bytes:
      op = kernel.op_name.split("/")[-3:]
      when_taken = " if taken" if kernel.opcode == "conditional" else ""
      lines.append(
        f"    {kernel.name:34s} {kernel.kind or kernel.opcode:6s} reads {kernel.big_read_bytes / x_bytes:.1f}"
        f" writes {kernel.big_write_bytes / x_bytes:.1f}{when_taken}  ({'/'.join(op)})"
      )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.hlo", description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="65536,256")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--only", default="", help="comma-separated implementation names")
  parser.add_argument("--prototypes", action="store_true", help="include benchmarks.prototypes")
  parser.add_argument("--dump", default=None, help="directory for the full optimised HLO texts")
  args = parser.parse_args(argv)
  implementations = list(ops.IMPLEMENTATIONS)
  if args.prototypes:
    from benchmarks import prototypes  # pylint: disable=g-import-not-at-top

    implementations += list(prototypes.IMPLEMENTATIONS)
  if args.only:
    implementations = [impl for impl in implementations if impl.name in args.only.split(",")]
  implementations = [impl for impl in implementations if impl.family != "torch"]
  shape = tuple(int(d) for d in args.shape.split(","))
  print(f"Machine: {_harness.machine_line(_harness.machine_info())}")
  for mode in ops.MODES:
    case = ops.Case(shape, args.dtype, mode)
    data = ops.make_case_data(case)
    x_bytes = data.x.size * data.x.dtype.itemsize
    for impl in implementations:
      if not impl.supports(case):
        continue
      prepared = impl.build(case, data)
      text = prepared.jitted.lower(*prepared.args).compile().as_text()
      if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        filename = re.sub(r"[^\w.]+", "_", f"{impl.name}_{mode}_{args.dtype}_{args.shape}") + ".hlo.txt"
        with open(os.path.join(args.dump, filename), "w") as f:
          f.write(text)
      print(describe(impl.name, mode, anatomy(text, data.x.size, data.x.dtype.itemsize), x_bytes))
  return 0


if __name__ == "__main__":
  sys.exit(main())
