"""Every benchmark table in one command, at sizes that suit the device it finds.

Usage::

  python benchmarks/run_all.py            # the full run for this device (CPU: about an hour)
  python benchmarks/run_all.py --quick    # every table at tiny sizes (minutes): proves the path
  python benchmarks/run_all.py --only filtering fused-real
  python benchmarks/run_all.py --list     # the tables and their commands, without running

Runs the benchmark scripts (``real_lm.py``, ``fused.py``, ``token_stats.py``,
``distillation.py``, ``filtering.py``, ``evaluate.py``, ``evaluate_step.py``,
``mutual_information.py`` and
``contrastive.py`` when it exists), each in its own process, on the synthetic inputs and on the
real-model activations of `benchmarks/real_lm.py` (trained and cached on first
use), and writes their markdown tables, headed by the device, to
``benchmarks/results/<device>.md`` (``<device>-quick.md`` with ``--quick``)
and to stdout. A table whose script fails is reported as failed, with the end
of its error output, and the command exits non-zero after the others ran.

Sizes. The synthetic timing size is N=2048, D=1024, V=32768 on a CPU, and on a
GPU or TPU N=8192, D=2048, V=131072 (V=65536 with less than 32 GiB); the
compile-only memory rows are at N=8192, D=2048, V=262144 everywhere. The
filtering table is at N=2048, D=1024, V=32768 on every device (the issue's
targets are set there). The real model has its own V (32768) and at most 8192
cached tokens; its hidden states are mapped isometrically to the table's D
(`benchmarks/_settings.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FILTER_SIZE = (2048, 1024, 32768)


@dataclasses.dataclass(frozen=True)
class Profile:
  size: tuple[int, int, int]  # synthetic timing size
  memory: tuple[int, int, int] | None  # compile-only size (None: the scripts' default, Gemma)
  filtering: tuple[int, int, int]
  repeats: int
  evaluate: tuple[str, ...]  # extra arguments of evaluate.py
  real: str  # the cached real model: "full" or "quick"


QUICK = Profile((256, 128, 4096), (512, 256, 8192), (256, 128, 4096), 2, (
  "--examples", "20000", "--batch-size", "5000", "--repeats", "1"), "quick")  # fmt: skip
CPU = Profile((2048, 1024, 32768), None, FILTER_SIZE, 5, (), "full")


def accelerator(memory_bytes) -> Profile:
  large = memory_bytes is None or memory_bytes >= 32 * 2**30
  size = (8192, 2048, 131072) if large else (8192, 2048, 65536)
  return Profile(size, None, FILTER_SIZE, 10, (), "full")


def find_device() -> dict:
  """The first device, asked in a child process (so this one never holds accelerator memory)."""
  code = (
    "import json, jax; d = jax.devices()[0]; s = getattr(d, 'memory_stats', lambda: None)();"
    "print(json.dumps({'platform': d.platform, 'kind': d.device_kind, 'count': jax.device_count(),"
    "'memory': (s or {}).get('bytes_limit')}))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def csv(size) -> str:
  return ",".join(map(str, size))


def steps(p: Profile, quick: bool) -> dict[str, tuple[str, list[str]]]:
  """`key: (title, argv)` of every table, in the order they run."""
  size = ["--size", csv(p.size), "--repeats", str(p.repeats)]
  memory = [] if p.memory is None else ["--memory-size", csv(p.memory)]
  real = ["--setting", "real", "--no-memory"]
  out = {
    "real-lm": ("Real-model setting: models and next-token distributions", ["real_lm.py"]),
    "fused": ("Fused cross-entropy (random inputs)", ["fused.py", *size, *memory]),
    "fused-real": ("Fused cross-entropy (real model)", ["fused.py", *size, *real]),
    "token-stats": ("Token statistics (random inputs)", ["token_stats.py", *size, *memory]),
    "token-stats-real": (
      "Token statistics (real model)",
      ["token_stats.py", *size, *real, "--only", "pg"],
    ),
    "preference": (
      "DPO step from hidden states (random inputs)",
      ["preference.py", *size, *memory],
    ),
    "preference-real": (
      "DPO step from hidden states (real model)",
      ["preference.py", *size, *real],
    ),
    "distillation": ("Distillation (random teacher)", ["distillation.py", *size, *memory]),
    "distillation-real": (
      "Distillation (real teacher and student)",
      ["distillation.py", *size, *real],
    ),
    "filtering": (
      "Gradient filtering on three distributions",
      ["filtering.py", "--size", csv(p.filtering), "--repeats", str(p.repeats)],
    ),
    "evaluate": ("Streaming evaluation", ["evaluate.py", *p.evaluate]),
    "evaluate-step": (
      "Streaming evaluation: the compiled step alone",
      ["evaluate_step.py", *(["--repeats", "2", "--batches", "4"] if quick else [])],
    ),
  }
  if quick:
    out["real-lm"][1].append("--quick")
  out["coding"] = (
    "Range coding against constriction",
    ["coding.py", *(["--small"] if quick else [])],
  )
  if (BENCH / "contrastive.py").exists():
    out["contrastive"] = ("Contrastive losses", ["contrastive.py", *(["--small"] if quick else [])])
  out["mutual-information"] = (
    "Bounds on mutual information",
    ["mutual_information.py", *(["--small"] if quick else [])],
  )
  return out


def run_step(argv, env) -> tuple[int, str, str, float]:
  """Run one script; its stderr (progress bars) goes to the terminal and is kept for failures."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(
    [sys.executable, str(BENCH / argv[0]), *argv[1:]],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  out, err = proc.communicate()
  sys.stderr.write(err[-4000:])
  return proc.returncode, out, err, time.perf_counter() - t0


def slug(device: dict) -> str:
  return re.sub(r"[^a-z0-9]+", "-", f"{device['platform']}-{device['kind']}".lower()).strip("-")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes: proves every table runs")
  p.add_argument("--only", nargs="+", default=None, help="run only these tables (see --list)")
  p.add_argument("--list", action="store_true", help="print the tables and commands, run nothing")
  p.add_argument("--out", default=None, help="the markdown file (default benchmarks/results/...)")
  args = p.parse_args(argv)

  device = find_device()
  if args.quick:
    profile = QUICK
  elif device["platform"] == "cpu":
    profile = CPU
  else:
    profile = accelerator(device["memory"])
  plan = steps(profile, args.quick)
  if args.only:
    unknown = set(args.only) - set(plan)
    if unknown:
      raise SystemExit(f"unknown table(s) {sorted(unknown)}; one of {list(plan)}")
    plan = {k: v for k, v in plan.items() if k in args.only}
  if args.list:
    for key, (title, cmd) in plan.items():
      print(f"{key:18s} {title}: python benchmarks/{' '.join(cmd)}")
    return

  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env["XENTJAX_BENCH_REAL"] = profile.real
  name = slug(device) + ("-quick" if args.quick else "")
  out_path = pathlib.Path(args.out) if args.out else BENCH / "results" / f"{name}.md"
  memory = f", {device['memory'] / 2**30:.0f} GiB" if device["memory"] else ""
  head = [
    f"# Benchmarks on {device['platform']} ({device['kind']}, {device['count']} device(s){memory})",
    "",
    (
      f"`python benchmarks/run_all.py{' --quick' if args.quick else ''}`; started "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; synthetic timing size "
      f"N, D, V = {csv(profile.size)}, filtering at {csv(profile.filtering)}, "
      f"{profile.repeats} repeats."
    ),
  ]
  sections, failed = ["\n".join(head)], []
  print(sections[0], flush=True)
  for key, (title, cmd) in plan.items():
    print(f"\n[run_all] {key}: python benchmarks/{' '.join(cmd)}", file=sys.stderr, flush=True)
    rc, out, err, seconds = run_step(cmd, env)
    body = out.strip()
    if rc != 0:
      failed.append(key)
      tail = "\n".join(err.strip().splitlines()[-15:])
      body += f"\n\n**Failed** (exit {rc}):\n\n```\n{tail}\n```"
    section = f"## {title}\n\n`python benchmarks/{' '.join(cmd)}` ({seconds:.0f} s)\n\n{body}"
    sections.append(section)
    print("\n" + section, flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n\n".join(sections) + "\n")  # after every table: a crash keeps the rest
  print(f"\nWrote {out_path}", file=sys.stderr)
  if failed:
    raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
  main()
