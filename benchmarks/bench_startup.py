"""Command start-up: `ckptfmt --help` and `ckptfmt verify` of tiny checkpoints, wall time.

What a CI gate or a pre-commit hook feels is mostly the interpreter start and the imports.
Every case is a fresh process of the installed `ckptfmt` console script; the peer is the
same job done by hand in Python: open a tiny .safetensors with `safetensors.safe_open`
(framework "numpy") and list its keys (reading its header). `python -c pass` is shown as the
floor. Tiny inputs: a 2-tensor ckptfmt checkpoint, a 1-tensor .safetensors, the committed
20-variable TensorFlow fixture (fixtures/tf/tf_module). A .pt verify is listed for
information (it needs torch's import, by design: torch files are read through torch).

Medians of alternating rounds (the order rotates every round), ratios to the peer.
Target: <= 0.25 s for `--help` and for verify of ckptfmt, safetensors and TF inputs.

Run: python benchmarks/bench_startup.py [--quick] [--with-torch]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
from _common import REPO, Case, fmt_s, header, median, parser, run_rounds, scratch_dir, spread, table  # noqa: E402

import ckptfmt  # noqa: E402

TARGET = 0.25


def _script() -> str:
    here = Path(sys.executable).parent / "ckptfmt"
    return str(here) if here.exists() else (shutil.which("ckptfmt") or "ckptfmt")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--with-torch", action="store_true", help="also time verify of a tiny .pt (pays torch's import)")
    args = p.parse_args()
    rounds = 5 if args.quick else 15
    header("command start-up (wall time of a fresh process)")
    exe = _script()
    env = dict(os.environ, CI="1")
    with scratch_dir(1 << 20, args.dir) as root:
        ck = str(root / "ck")
        ckptfmt.save({"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32), "step": 1}, ck)
        st = str(root / "w.safetensors")
        from safetensors.numpy import save_file

        save_file({"w": np.ones((2, 3), np.float32)}, st)
        tf = str(REPO / "fixtures" / "tf" / "tf_module" / "ckpt-1")

        def run(argv: list[str]):
            def fn():
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd=str(root))
            return fn

        peer_code = f"from safetensors import safe_open\nwith safe_open({st!r}, framework='numpy') as f: list(f.keys())"
        cases = [
            Case("ckptfmt --help", run([exe, "--help"])),
            Case("ckptfmt verify (ckptfmt)", run([exe, "verify", ck])),
            Case("ckptfmt verify (safetensors)", run([exe, "verify", st])),
            Case("ckptfmt verify (tf)", run([exe, "verify", tf])),
            Case("peer: safetensors header in Python", run([sys.executable, "-c", peer_code])),
            Case("floor: python -c pass", run([sys.executable, "-c", "pass"])),
        ]
        if args.with_torch:
            import torch

            pt = str(root / "w.pt")
            torch.save({"w": torch.ones(2, 3)}, pt)
            cases.append(Case("ckptfmt verify (.pt, imports torch)", run([exe, "verify", pt])))
        times = run_rounds([[c] for c in cases], rounds)
        peer = median(times["peer: safetensors header in Python"])
        rows = []
        verdicts = []
        for k, v in times.items():
            m = median(v)
            goal = k.startswith("ckptfmt") and ".pt" not in k
            rows.append([k, fmt_s(m), spread(v), f"{m / peer:.2f}", ("PASS" if m <= TARGET else "FAIL") if goal else ""])
            if goal:
                verdicts.append(m <= TARGET)
        table(["command", "median", "spread (s)", "time / peer", f"<= {TARGET} s"], rows, title=f"\n{rounds} alternating rounds")
        print(f"\nsummary\n  {sum(verdicts)}/{len(verdicts)} commands within {TARGET} s; peer {fmt_s(peer)}")


if __name__ == "__main__":
    main()
