"""A GPT-2-small-shaped model's top Hessian eigenvalue within 8 GB of CPU memory (#23, item 6).

Claim checked: flatcli's Lanczos over its Hessian operator (float32 network, ``token-ce`` with
the float64 head the commands use by default, the automatic chunk size) finds the top
eigenvalue of a 124M-parameter GPT-2-small-shaped model (12 layers, width 768, 12 heads,
vocabulary 50,257, 1,024 positions, tied input/output embedding, random weights) on 4
sequences of 256 tokens within 8 GB of memory. The measurement runs in a fresh subprocess, which
reports its peak resident set (``VmHWM`` of ``/proc/self/status``, the same number as
``getrusage(RUSAGE_SELF).ru_maxrss``) after each phase, and the time of each phase.

What the memory is made of (printed with the result): the float32 parameters (0.5 GB), the
Krylov basis (``steps + 1`` rows; ``--basis-dtype auto``, the default of ``lanczos``, stores a
float32 operator's basis in float32 once the float64 one would exceed 2 GiB: 0.5 GB a row here
instead of 1.0 GB), and one product: a chunk's activations and double-backward graph, its
float64 head (N·T·V logits, 103 MB per copy for one 256-token sequence) and two
parameter-sized vectors (autograd's result and the flat product).

    OMP_NUM_THREADS=1 python benchmarks/bench_gpt_scale.py             # ~5 min, 4 steps
    OMP_NUM_THREADS=1 python benchmarks/bench_gpt_scale.py --steps 2   # fewer products
    OMP_NUM_THREADS=1 python benchmarks/bench_gpt_scale.py --basis-dtype float64  # the old basis
    OMP_NUM_THREADS=1 python benchmarks/bench_gpt_scale.py --quick     # a 2-layer, 8k-vocab model

``--root DIR`` imports flatcli from DIR instead of this checkout (e.g. an older version
extracted with ``git archive``), to compare versions in the same conditions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head attention and a GELU MLP (GPT-2 layout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (B, heads, T, head width)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(h.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A GPT-2-shaped causal language model: (N, T) token ids -> (N, T, vocab) logits.

    ``tied``: the output layer reuses the token embedding (GPT-2's tied head).
    """

    def __init__(
        self,
        vocab: int = 50257,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        context: int = 1024,
        tied: bool = True,
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for module in self.modules():  # GPT-2's initialisation: N(0, 0.02), zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def token_data(vocab: int, sequences: int, length: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random token windows: inputs (N, T) and next-token targets (N, T)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, vocab, (sequences, length + 1), generator=g)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _peak_bytes() -> int:
    """This process's peak resident set so far (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(args: argparse.Namespace) -> dict:
    """The measurement, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    from flatcli.curvature.lanczos import lanczos

    lanczos_module = importlib.import_module("flatcli.curvature.lanczos")  # not the function
    from flatcli.curvature.lanczos import lanczos_memory
    from flatcli.curvature.memory import estimate_memory
    from flatcli.curvature.operators import make_operator

    phases: list[dict] = []

    def phase(name: str, start: float, cpu: float) -> tuple[float, float]:
        now, now_cpu = time.perf_counter(), time.process_time()
        phases.append(
            {
                "phase": name,
                "wall_s": round(now - start, 2),
                "cpu_s": round(now_cpu - cpu, 2),
                "rss_gib": round(_rss_bytes() / GIB, 2),
                "peak_gib": round(_peak_bytes() / GIB, 2),
            }
        )
        return now, now_cpu

    t, c = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    shape = dict(vocab=args.vocab, width=args.width, layers=args.layers, heads=args.heads)
    model = GPT(**shape, context=args.context).eval()
    x, y = token_data(args.vocab, args.sequences, args.seq_len)
    dim = sum(p.numel() for p in model.parameters())
    t, c = phase("model", t, c)
    head_dtype = None if args.head_dtype == "float32" else torch.float64
    op = make_operator(
        "hessian",
        model,
        x,
        y,
        loss_fn="token-ce",
        head_dtype=head_dtype,
        batch_size=args.batch_size,
    )
    t, c = phase("operator (probe product)", t, c)
    chooser = getattr(lanczos_module, "choose_basis_dtype", None)  # None: an older flatcli
    if chooser is None:
        basis, options = "float64", {}
    else:
        resolved = {"float32": torch.float32, "float64": torch.float64}.get(args.basis_dtype)
        basis_dtype = resolved or chooser(op.dtype, dim, args.steps + 1, "cpu")
        basis = str(basis_dtype).removeprefix("torch.")
        options = {"basis_dtype": args.basis_dtype}
    if args.max_basis is not None:
        options["max_basis"] = args.max_basis
    res = lanczos(op, k=1, steps=args.steps, tol=args.tol, **options)
    t, c = phase(f"lanczos ({res.matvecs} HVPs)", t, c)
    extra = {"basis_dtype": basis} if chooser is not None else {}
    if args.max_basis is not None:
        extra["max_basis"] = args.max_basis
    lanczos_bytes = lanczos_memory(dim, 1, args.steps, model_params=dim, **extra).bytes
    try:
        chunk_bytes: float | None = estimate_memory(
            model,
            (args.seq_len,),
            args.seq_len * args.vocab,
            op.batch_size,
            x_dtype=x.dtype,
            positions=args.seq_len,
            head_dtype=head_dtype,
        )
    except TypeError:  # an older flatcli (--root) without the head terms
        chunk_bytes = None
    return {
        "params": dim,
        "sequences": args.sequences,
        "seq_len": args.seq_len,
        "head_dtype": args.head_dtype,
        "batch_size": op.batch_size,
        "hvp_method": op.hvp_method,
        "attention_kernel": op.attention,
        "basis_dtype": basis,
        "steps": res.steps,
        "max_basis": args.max_basis,
        "converged": res.converged,
        "hvps": res.matvecs,
        "top_eigenvalue": float(res.eigenvalues[0]),
        "residual": float(res.residuals[0]),
        "peak_gib": round(_peak_bytes() / GIB, 2),
        "peak_gb": round(_peak_bytes() / 1e9, 2),
        "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "estimate_gib": {
            "lanczos_basis_and_params": round(lanczos_bytes / GIB, 2),
            "one_chunk_product": None if chunk_bytes is None else round(chunk_bytes / GIB, 2),
            "head_copy_per_sequence_mib": round(args.seq_len * args.vocab * 8 / 2**20, 1),
        },
        "phases": phases,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="Lanczos steps (HVPs)")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="default: automatic")
    p.add_argument("--head-dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument(
        "--basis-dtype",
        choices=("auto", "float32", "float64"),
        default="auto",
        help="dtype of the Lanczos basis (default auto: lanczos's own rule)",
    )
    p.add_argument(
        "--max-basis",
        type=int,
        default=None,
        help="basis vectors kept before a thick restart (default: lanczos's own rule)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-gb", type=float, default=8.0, help="the memory target (1e9 bytes)")
    p.add_argument("--quick", action="store_true", help="2 layers, width 256, vocabulary 8,192")
    p.add_argument("--root", type=Path, default=None, help="import flatcli from this directory")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    big = dict(vocab=50257, width=768, layers=12, heads=12, context=1024)
    small = dict(vocab=8192, width=256, layers=2, heads=4, context=256)
    for key, value in (small if args.quick else big).items():
        setattr(args, key, value)
    if args.child:
        sys.path.insert(0, str(args.root or REPO))
        print(json.dumps(child(args)))
        return
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the measuring subprocess failed (exit {proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["subprocess_wall_s"] = round(wall, 1)
    out["children_maxrss_gib"] = round(
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2
    )
    out["fits"] = out["peak_gb"] <= args.limit_gb
    out["load_average"] = os.getloadavg()
    print(
        f"GPT: {out['params']:,} parameters, {out['sequences']} x {out['seq_len']} tokens, "
        f"head {out['head_dtype']}, chunk {out['batch_size']} sequence(s), "
        f"{out['hvp_method']}, attention {out['attention_kernel']}, "
        f"{out.get('basis_dtype', 'float64')} Krylov basis"
    )
    print("| phase | wall s | CPU s | RSS after (GiB) | peak so far (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for ph in out["phases"]:
        print(
            f"| {ph['phase']} | {ph['wall_s']} | {ph['cpu_s']} | {ph['rss_gib']} | "
            f"{ph['peak_gib']} |"
        )
    print(
        f"top eigenvalue {out['top_eigenvalue']:.6g} (residual {out['residual']:.2e}, "
        f"{out['steps']} steps); peak RSS {out['peak_gb']} GB = {out['peak_gib']} GiB "
        f"({'within' if out['fits'] else 'ABOVE'} {args.limit_gb} GB); "
        f"subprocess {out['subprocess_wall_s']} s; estimate {out['estimate_gib']}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
