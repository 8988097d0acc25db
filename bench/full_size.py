"""Full-size rehearsals through the real CLIs on 2 gloo CPU ranks (issue 20).

1. **EVA02-E-14-plus** (4.35B image tower, random bf16 weights written one tensor at a time): in-engine
   pruning at r=1 under FSDP2 and DeepSpeed ZeRO-3, ``engine.precision=bf16``, ``run.steps=0``, with and
   without output-mode compensation on a small calibration set, then ``python -m trainer export``; the export
   is compared with ``python -m pruning prune`` of the same checkpoint with the same calibration images
   (kept indices and weights identical without compensation; the largest difference with it).
2. **ViT-g-14** (1.01B -> 0.48B at r=1), FSDP2 and ZeRO-3, in-engine pruning, distillation on webdataset
   shards: an uninterrupted run, and a run whose rank 1 is killed with SIGKILL after the mid-way checkpoint and
   which ``resume=auto`` brings to the end; the resumed losses (TensorBoard) must equal the uninterrupted
   ones; the export is loaded by stock open_clip in a fresh process.

ViT-g runs at 112 px (``configs/open_clip/ViT-g-14-112.json``: the same tower, position table for 112 px);
EVA at its native 224 px (open_clip 3.3.0 does not pass an input size to a timm trunk) on 8 calibration
pictures, as many tokens as 32 at 112 px. Pictures are random (smooth noise). Every rank's anonymous RSS (``/proc/<pid>/status`` RssAnon) is polled every 0.2 s and
attributed to the phases rank 0 prints (``phase <name>: ... [start end]``, trainer/loop.py); the export
and the offline prune are measured as whole processes. Each row also carries the planner's CPU prediction
(``python -m trainer plan --cpu``, tools/plan.py) of the peak per rank. A memory guard kills a run (by its
process group) whose processes together pass ``--max-rss-gib``.

    .venv/bin/python bench/full_size.py [--only eva vitg] [--engines fsdp zero3] [--tiny --out DIR/x.json]

``--tiny`` runs the same sequence on the 2-block ViT-Tiny-8 (both parts) in a few minutes
(tests/smoke/test_full_size.py). Full size writes ``bench/results/full_size.json``.

``--prepare-eva DIR [--eva-modes ...] [--ridge L]`` writes the EVA checkpoint, calibration shards and offline
prunes once, for later ``--reuse-eva DIR`` runs (the same ``--ridge``). ``FULL_SIZE_KEEP_EXPORTS=1`` keeps the
compensated exports beside the work folder (named in the results) for a per-block look.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and bench/select.py would shadow the
# standard library's ``select`` that subprocess needs.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

import trainer.models.open_clip_family  # noqa: E402, F401  registers configs/open_clip (the -112 towers)
from pruning import Calibration  # noqa: E402
from pruning.export import resolve_architecture  # noqa: E402
from pruning.safetensors_stream import SafetensorsWriter  # noqa: E402
from tools.plan import cpu_peak_per_rank  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "full_size.json"
BASE_CONFIG = REPO / "configs" / "base.yaml"
OPEN_CLIP_CONFIGS = REPO / "configs" / "open_clip"
GIB = 1024 ** 3
ENGINES = {"fsdp": ["engine.name=fsdp"], "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"]}
PHASE = re.compile(r"^phase (\w+): ([\d.]+) s \[([\d.]+) ([\d.]+)\]", re.M)
STEP = re.compile(r"^step (\d+)/(\d+) loss (\S+) lr \S+ ([\d.]+) img/s", re.M)


@dataclass(frozen=True)
class Size:
    """One size of the rehearsal: the models, images and run lengths."""

    eva: str
    vitg: str
    eva_px: int
    image_px: int
    """The ViT-g part's input size."""
    ratio: float
    calib_images: int
    """Calibration pictures in all (each rank reads its half: one batch of calib_images / 2)."""
    train_images: int
    batch_per_rank: int
    steps: int
    save_every: int
    kill_after_step: int
    """The interrupted run loses rank 1 to SIGKILL once rank 0 has logged this step (after save_every)."""
    eva_whole_clip: bool
    """Write the EVA teacher as a whole CLIP (True) or as its image tower alone."""
    data_workers: int
    """DataLoader workers per rank (0 at full size: each spawned worker costs ~0.3 GiB on a full machine)."""


# EVA through open_clip is a timm trunk whose input size open_clip does not pass on (3.3.0): it runs at its
# native 224 px, with 8 calibration pictures (2056 tokens, as many as 32 pictures at 112 px).
FULL = Size(eva="EVA02-E-14-plus", vitg="ViT-g-14-112", eva_px=224, image_px=112, ratio=1.0, calib_images=8,
            train_images=64, batch_per_rank=2, steps=10, save_every=5, kill_after_step=7, eva_whole_clip=False,
            data_workers=0)
TINY = Size(eva="ViT-Tiny-8", vitg="ViT-Tiny-8", eva_px=32, image_px=32, ratio=0.5, calib_images=32, train_images=64,
            batch_per_rank=4, steps=30, save_every=15, kill_after_step=18, eva_whole_clip=True,
            data_workers=1)


# ---------------------------------------------------------------------------------------------- inputs

def write_random_checkpoint(model: str, path: Path, *, whole_clip: bool, seed: int = 0) -> dict:
    """Random bf16 weights for ``model`` (its image tower, or the whole CLIP), one tensor at a time."""
    arch = resolve_architecture(f"open_clip:{model}")
    state = (arch.model if whole_clip else arch.tower).state_dict()  # meta tensors: names and shapes only
    specs = [(k, tuple(v.shape), torch.bfloat16) for k, v in state.items()]
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with SafetensorsWriter(path, specs) as writer:
        for name, shape, dtype in specs:
            scale = 1.0 if name.endswith(("logit_scale",)) else 0.02
            writer.write(name, (torch.randn(shape, generator=g) * scale).to(dtype))
    return {"seconds": round(time.perf_counter() - start, 1), "bytes": path.stat().st_size,
            "elements": sum(v.numel() for v in state.values()), "whole_clip": whole_clip}


def make_shards(root: Path, count: int, px: int, shard_size: int) -> tuple[Path, list[str]]:
    """``count`` random pictures -> webdataset tars with the repo's shard maker: (shards.txt, tar paths)."""
    gen = np.random.default_rng(0)
    images = root / "images"
    for i in range(count):
        folder = images / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth random pictures (upsampled noise): less like white noise than raw pixels.
        small = gen.integers(0, 255, (px // 8 + 1, px // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((px, px), Image.BILINEAR).save(folder / f"{i:04d}.png")
    out = root / "shards"
    run_checked([sys.executable, "-m", "trainer.data.make_shards", str(images), str(out),
                 "--shard-size", str(shard_size)], timeout=600)
    return out / "shards.txt", sorted(str(p) for p in out.glob("*.tar"))


def run_checked(cmd: list[str], timeout: int) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def child_env() -> dict[str, str]:
    # One thread per rank: the 2 ranks share the 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------- processes

def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, parents first."""
    seen = [root]
    i = 0
    while i < len(seen):
        seen.extend(_children(seen[i]))
        i += 1
    return seen


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every descendant, each by its PID: torchrun starts each rank in a session of its
    own, so killing torchrun's process group leaves the ranks running."""
    for pid in _tree(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


MIN_AVAILABLE = {"bytes": GIB // 2}
"""The memory guard also stops a run when the machine's MemAvailable falls below this (full size only: a tiny
run cannot be what exhausts the machine)."""


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _prefer_for_oom_kill(pid: int) -> None:
    """Should the kernel run out of memory anyway, it kills the benchmark's processes before anyone else's."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
    except OSError:
        pass


def _pss_anon(pid: int) -> int:
    """Proportional anonymous memory: a data-loader worker forked from a rank shares its pages copy-on-write,
    and RssAnon would count them once per process."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    return 0


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@dataclass
class Watch:
    """RssAnon samples of each rank process (or of a single process: rank 0) and the peak Pss_Anon of the tree."""

    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    rank_pids: dict[int, int] = field(default_factory=dict)
    tree_peak: int = 0
    guard_tripped: bool = False
    adjusted: set[int] = field(default_factory=set)


def _poll(root: int, torchrun: bool, watch: Watch, stop: threading.Event, limit: int) -> None:
    while not stop.is_set():
        now = time.time()
        tree, seen = 0, _tree(root)
        for pid in seen:
            if pid not in watch.adjusted:
                _prefer_for_oom_kill(pid)
                watch.adjusted.add(pid)
            try:
                anon = int(_status(pid).get("RssAnon", "0 kB").split()[0]) * 1024
                tree += _pss_anon(pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            if torchrun:
                rank = next((r for r, p in watch.rank_pids.items() if p == pid), None)
                if rank is None and pid in _children(root):
                    rank = _rank_of(pid)
                    if rank is not None:
                        watch.rank_pids[rank] = pid
            else:
                rank = 0 if pid == root else None
                if rank == 0:
                    watch.rank_pids[0] = pid
            if rank is not None:
                watch.samples.setdefault(rank, []).append((now, anon))
        watch.tree_peak = max(watch.tree_peak, tree)
        # The machine is shared: stop before the kernel's OOM killer picks a process (anyone's) for us.
        if (tree > limit or _mem_available() < MIN_AVAILABLE["bytes"]) and not watch.guard_tripped:
            watch.guard_tripped = True
            kill_tree(root)
        _sample_ranks(watch, stop, until=time.time() + 0.2)


def _sample_ranks(watch: Watch, stop: threading.Event, until: float) -> None:
    """RssAnon of the known ranks every 5 ms between the full polls: the tree walk and smaps_rollup are slow
    on a loaded machine, and a short peak (a checkpoint chunk held for 50 ms) would fall between them."""
    while not stop.is_set() and time.time() < until:
        now = time.time()
        for rank, pid in list(watch.rank_pids.items()):
            try:
                anon = int(_status(pid).get("RssAnon", "0 kB").split()[0]) * 1024
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            samples = watch.samples.setdefault(rank, [])
            if not samples or samples[-1][1] != anon:  # only changes: hours of sampling stay small
                samples.append((now, anon))
        stop.wait(0.005)


LIVE: set[int] = set()
"""The children running now: a stopped benchmark kills them and their descendants."""


def _kill_live(signum: int, _frame: object) -> None:
    for pid in list(LIVE):
        kill_tree(pid)
    raise SystemExit(128 + signum)


class Launch:
    """One child command (torchrun or a single process) in its own session, its RSS polled."""

    def __init__(self, cmd: list[str], log: Path, limit_bytes: int, torchrun: bool) -> None:
        self.cmd, self.log_path = cmd, log
        self.log = open(log, "w")
        self.start = time.time()
        self.usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        LIVE.add(self.proc.pid)
        self.watch = Watch()
        self.stop = threading.Event()
        self.poller = threading.Thread(target=_poll, args=(self.proc.pid, torchrun, self.watch, self.stop,
                                                           limit_bytes), daemon=True)
        self.poller.start()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait(timeout=60)
        self.end = time.time()
        # CPU seconds of the command and its reaped descendants (torchrun waits for its ranks): on a shared
        # machine a steadier cost figure than wall time.
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_seconds = {"user": round(usage.ru_utime - self.usage.ru_utime, 1),
                            "system": round(usage.ru_stime - self.usage.ru_stime, 1)}
        LIVE.discard(self.proc.pid)
        self.stop.set()
        self.poller.join()
        self.log.close()
        return code

    def kill(self) -> None:
        kill_tree(self.proc.pid)

    def peaks(self, windows: dict[str, list[tuple[float, float]]] | None = None) -> dict:
        """Peak RssAnon (GiB) per rank overall and per phase (time summed over a phase's occurrences)."""
        out: dict = {"peak_rss_anon_gib": {}, "tree_peak_pss_anon_gib": round(self.watch.tree_peak / GIB, 3),
                     "cpu_seconds": getattr(self, "cpu_seconds", None)}
        for rank, samples in sorted(self.watch.samples.items()):
            out["peak_rss_anon_gib"][rank] = round(max(v for _, v in samples) / GIB, 3)
        if windows:
            if "resume" in windows:  # the training steps (with their saves): from the resume to the exit
                windows["train"] = [(windows["resume"][-1][1], self.end)]
            out["phases"] = {}
            for name, spans in windows.items():
                per_rank = {}
                for rank, samples in sorted(self.watch.samples.items()):
                    # Samples are kept when the value changes: the one in effect at a window's start counts too.
                    inside = [v for i, (t, v) in enumerate(samples)
                              if any(a - 0.25 <= t <= b + 0.25
                                     or (t < a and (i + 1 == len(samples) or samples[i + 1][0] > a)) for a, b in spans)]
                    per_rank[rank] = round(max(inside) / GIB, 3) if inside else None
                out["phases"][name] = {"seconds": round(sum(b - a for a, b in spans), 1), "times": len(spans),
                                       "peak_rss_anon_gib": per_rank}
        return out


def phases_of(log: str) -> dict[str, list[tuple[float, float]]]:
    """Phase windows from rank 0's lines, by name; a repeated phase (save) has one window per occurrence."""
    windows: dict[str, list[tuple[float, float]]] = {}
    for name, _, start, end in PHASE.findall(log):
        windows.setdefault(name, []).append((float(start), float(end)))
    return windows


def run_single(cmd: list[str], log: Path, limit: int, timeout: int) -> dict:
    launch = Launch(cmd, log, limit, torchrun=False)
    code = launch.wait(timeout)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}, guard {launch.watch.guard_tripped}):\n{launch.text()[-4000:]}")
    return {"seconds": round(launch.end - launch.start, 1), **launch.peaks()}


def torchrun(args: list[str]) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
            "--max-restarts", "0", "-m", "trainer", str(BASE_CONFIG), *args]


def train_args(size: Size, model: str, ckpt: Path, run_dir: Path, engine: str, shards: Path, steps: int,
               extra: list[str]) -> list[str]:
    return [f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every_steps=1", "model.family=open_clip",
            f"model.name={model}", f"model.pretrained={ckpt}", "prune.in_engine=true", f"prune.ratio={size.ratio}",
            *ENGINES[engine], "engine.precision=bf16", "data.kind=webdataset", f"data.shards={shards}",
            f"data.num_workers={size.data_workers}", "data.shuffle_buffer=0", f"optim.batch_size_per_rank={size.batch_per_rank}",
            "checkpoint.every_minutes=0", f"checkpoint.every_steps={size.save_every}", *extra]


def predicted(args: list[str]) -> dict:
    """The planner's CPU prediction of the peak RssAnon per rank for this run (GiB)."""
    return cpu_peak_per_rank(str(BASE_CONFIG), args, world_size=2)


# ---------------------------------------------------------------------------------------------- EVA part

def prepare_eva(size: Size, folder: Path, limit: int, modes: tuple[bool, ...], ridge: float | None = None
                ) -> tuple[dict, dict]:
    """The EVA checkpoint, calibration shards and offline prunes (``python -m pruning prune``) in ``folder``:
    (checkpoint figures, {compensated: (offline folder, its figures)}). ``ridge``: the offline compensation's
    ``--ridge`` (None: the CLI's default); the in-engine run must be given the same."""
    ckpt = folder / "eva.safetensors"
    written = write_random_checkpoint(size.eva, ckpt, whole_clip=size.eva_whole_clip)
    print(f"eva: wrote {written['bytes'] / GIB:.2f} GiB in {written['seconds']} s", flush=True)
    _, tars = make_shards(folder / "calib", size.calib_images, size.eva_px, size.calib_images // 2)
    model_config = OPEN_CLIP_CONFIGS / f"{size.eva}.json"  # a repo config (tiny); else open_clip's own
    offline = {}
    for comp in modes:
        out = folder / f"offline-{'comp' if comp else 'plain'}"
        cmd = [sys.executable, "-m", "pruning", "prune", "--model", size.eva, "--checkpoint", str(ckpt),
               "--ratio", str(size.ratio), "--out", str(out), "--quiet"]
        if model_config.is_file():
            cmd += ["--model-config", str(model_config)]
        if comp:
            # No held-out tokens on either side: the in-engine run holds out every rank's own tokens, the
            # offline prune those of the whole set, and the fits would differ by that split alone.
            cmd += ["--calibration", "::".join(tars), "--num-calib", str(size.calib_images),
                    "--calib-batch-size", str(size.calib_images // 2), "--calib-holdout", "0"]
            if ridge is not None:
                cmd += ["--ridge", str(ridge)]
        offline[comp] = (out, run_single(cmd, folder / f"{out.name}.log", limit, 3600))
        print(f"eva offline prune{' + compensation' if comp else ''}: {offline[comp][1]['seconds']} s, "
              f"peak {offline[comp][1]['peak_rss_anon_gib']} GiB", flush=True)
    return written, offline


def _offline_ridge(folder: Path) -> float | None:
    calib = json.loads((folder / "pruning_report.json").read_text()).get("calibration") or {}
    return calib.get("ridge")


def eva_part(size: Size, tmp: Path, engines: list[str], limit: int, reuse: Path | None = None,
             modes: tuple[bool, ...] = (False, True), ridge: float | None = None) -> dict:
    """The EVA part; ``modes``: without (False) and / or with (True) compensation; ``ridge``: the compensation's
    relative ridge on both sides (``prune.ridge`` and the offline ``--ridge``; None: their default).

    ``reuse``: a folder holding eva.safetensors, calib/ and offline-plain/, offline-comp/ of an earlier
    invocation or of ``--prepare-eva`` (hard links of its files): the checkpoint, pictures and offline prunes
    are not made again; its offline compensation must have used the same ridge."""
    if reuse is not None:
        for name in ("eva.safetensors", "calib", *(f"offline-{'comp' if c else 'plain'}" for c in modes)):
            os.link(reuse / name, tmp / name) if name.endswith(".safetensors") else \
                shutil.copytree(reuse / name, tmp / name, copy_function=os.link)
        if True in modes:
            want = Calibration.ridge if ridge is None else ridge
            have = _offline_ridge(tmp / "offline-comp")
            if have != want:
                raise ValueError(f"--reuse-eva {reuse}: its offline compensation used ridge {have}, this run {want}")
        written = {"reused_from": str(reuse), "bytes": (tmp / "eva.safetensors").stat().st_size}
        offline = {comp: (tmp / f"offline-{'comp' if comp else 'plain'}", {"reused_from": str(reuse)}) for comp in modes}
    else:
        written, offline = prepare_eva(size, tmp, limit, modes, ridge)
    ckpt = tmp / "eva.safetensors"
    shards_txt = tmp / "calib" / "shards" / "shards.txt"
    per_rank = size.calib_images // 2
    rows = []
    for engine in engines:
        for comp in modes:
            name = f"eva-{engine}-{'comp' if comp else 'plain'}"
            run_dir = tmp / name
            extra = ["prune.compensate=true", "prune.calib_batches=1", "prune.calib_holdout=0"] if comp else []
            if comp and ridge is not None:
                extra.append(f"prune.ridge={ridge}")
            args = train_args(size, size.eva, ckpt, run_dir, engine, shards_txt, 0, extra)
            args[args.index(f"optim.batch_size_per_rank={size.batch_per_rank}")] = f"optim.batch_size_per_rank={per_rank}"
            row = {"model": size.eva, "engine": engine, "compensation": comp, "run": name}
            row.update(train_row(args, tmp / f"{name}.log", limit))
            if row["exit_code"] == 0:
                out = tmp / f"{name}-export"
                row["export"] = run_single([sys.executable, "-m", "trainer", "export", str(run_dir), "--out", str(out)],
                                           tmp / f"{name}-export.log", limit, 3600)
                row["versus_offline"] = compare(out, run_dir, *offline[comp][:1], exact=not comp)
                if row["versus_offline"]["shape_mismatches"] or (comp and os.environ.get("FULL_SIZE_KEEP_EXPORTS")):
                    kept = tmp.parent / f"kept-{tmp.name}-{out.name}"
                    out.rename(kept)  # outside the temporary folder, named in the results, for inspection
                    row["kept_for_inspection"] = str(kept)
                else:
                    shutil.rmtree(out)
            shutil.rmtree(run_dir, ignore_errors=True)
            print_row(row)
            rows.append(row)
    for comp in modes:
        shutil.rmtree(offline[comp][0], ignore_errors=True)
    ckpt.unlink()
    return {"checkpoint": written, "offline_prune": {("comp" if c else "plain"): v[1] for c, v in offline.items()},
            "ridge": ridge, "rows": rows}


def train_row(args: list[str], log: Path, limit: int, timeout: int = 3600) -> dict:
    launch = Launch(torchrun(args), log, limit, torchrun=True)
    code = launch.wait(timeout)
    text = launch.text()
    row = {"exit_code": code, "wall_seconds": round(launch.end - launch.start, 1),
           "memory_guard_tripped": launch.watch.guard_tripped, **launch.peaks(phases_of(text))}
    row["planned_peak_rss_anon_gib"] = predicted(args)
    if code != 0:
        row["log_tail"] = text[-3000:]
    return row


def _weights(folder: Path) -> Path:
    found = sorted(folder.glob("*.safetensors"))
    assert len(found) == 1, found
    return found[0]


def compare(export: Path, run_dir: Path, offline: Path, *, exact: bool) -> dict:
    """Kept indices (prune reports) and every exported tensor against the offline prune's, one at a time."""
    mine = json.loads((run_dir / "prune_report.json").read_text())["sites"]
    theirs = json.loads((offline / "pruning_report.json").read_text())["sites"]
    same_kept = [a["kept"] for a in mine] == [b["kept"] for b in theirs]
    worst, worst_key, worst_rel, differing, keys = 0.0, None, 0.0, 0, 0
    per_tensor: dict[str, list[float]] = {}  # differing tensors: [max abs diff, that / the offline tensor's max |x|]
    shapes: list[tuple[str, list[int], list[int]]] = []
    with safe_open(_weights(export), "pt") as a, safe_open(_weights(offline), "pt") as b:
        prefix = "visual." if any(k.startswith("visual.") for k in b.keys()) else ""
        names = [k for k in b.keys() if k.startswith(prefix)]
        missing = sorted(set(names) - set(a.keys()))
        for key in names:
            if key in missing:
                continue
            x, y = a.get_tensor(key).float(), b.get_tensor(key).float()
            keys += 1
            if x.shape != y.shape:
                differing += 1
                worst, worst_key = float("inf"), key
                shapes.append((key, list(x.shape), list(y.shape)))
                continue
            diff = float((x - y).abs().max()) if x.numel() else 0.0
            if diff > 0:
                differing += 1
                rel = diff / max(float(y.abs().max()), 1e-30)
                worst_rel = max(worst_rel, rel)
                per_tensor[key] = [diff, rel]
            if diff > worst:
                worst, worst_key = diff, key
    return {"same_kept_indices": same_kept, "tensors_compared": keys, "missing_in_export": missing,
            "tensors_differing": differing, "max_abs_diff": worst, "max_abs_diff_tensor": worst_key,
            "max_diff_relative_to_tensor_max": worst_rel, "shape_mismatches": shapes[:4],
            "same_kept_per_block": [a["kept"] == b["kept"] for a, b in zip(mine, theirs, strict=False)], "differing": per_tensor,
            "equal": same_kept and not missing and differing == 0 if exact else None}


# ---------------------------------------------------------------------------------------------- ViT-g part

def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """``tag`` by step from the run's TensorBoard events (a resumed run's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def tb_losses(run_dir: Path) -> dict[int, float]:
    return tb_scalars(run_dir, "loss/total")


def vitg_part(size: Size, tmp: Path, engines: list[str], limit: int) -> dict:
    ckpt = tmp / "vitg.safetensors"
    written = write_random_checkpoint(size.vitg, ckpt, whole_clip=True)
    print(f"vitg: wrote {written['bytes'] / GIB:.2f} GiB in {written['seconds']} s", flush=True)
    shards_txt, _ = make_shards(tmp / "train", size.train_images, size.image_px, size.train_images // 4)
    rows = []
    for engine in engines:
        base = {"model": size.vitg, "engine": engine}
        straight_dir, broken_dir = tmp / f"vitg-{engine}-straight", tmp / f"vitg-{engine}-resumed"
        straight = {**base, "run": "uninterrupted"}
        args = train_args(size, size.vitg, ckpt, straight_dir, engine, shards_txt, size.steps, ["optim.warmup_steps=2"])
        straight.update(train_row(args, tmp / f"{straight_dir.name}.log", limit))
        straight.update(step_figures(tmp / f"{straight_dir.name}.log", size, straight_dir))
        print_row(straight)
        # The same command, rank 1 killed (SIGKILL) once rank 0 logged kill_after_step, then run again.
        args = train_args(size, size.vitg, ckpt, broken_dir, engine, shards_txt, size.steps, ["optim.warmup_steps=2"])
        killed = {**base, "run": "killed"}
        killed.update(kill_one_rank(args, tmp / f"{broken_dir.name}-killed.log", size.kill_after_step, limit))
        print_row(killed)
        resumed = {**base, "run": "resumed"}
        resumed.update(train_row(args, tmp / f"{broken_dir.name}.log", limit))
        resumed.update(step_figures(tmp / f"{broken_dir.name}.log", size, broken_dir))
        text = (tmp / f"{broken_dir.name}.log").read_text(errors="replace")
        resumed["resumed_from_step"] = size.save_every if f"at step {size.save_every}" in text else None
        if straight["exit_code"] == 0 and resumed["exit_code"] == 0:
            want, got = tb_losses(straight_dir), tb_losses(broken_dir)
            resumed["losses_uninterrupted"] = want
            resumed["losses_killed_and_resumed"] = got
            resumed["losses_equal"] = want == got and len(want) == size.steps
            out = tmp / f"vitg-{engine}-export"
            resumed["export"] = run_single([sys.executable, "-m", "trainer", "export", str(broken_dir), "--out",
                                            str(out)], tmp / f"{out.name}.log", limit, 3600)
            resumed["stock_open_clip"] = stock_load(out, size.image_px, tmp / f"{out.name}-stock.log", limit)
            shutil.rmtree(out, ignore_errors=True)
        print_row(resumed)
        rows += [straight, killed, resumed]
        shutil.rmtree(straight_dir, ignore_errors=True)
        shutil.rmtree(broken_dir, ignore_errors=True)
    ckpt.unlink()
    return {"checkpoint": written, "rows": rows}


def step_figures(log: Path, size: Size, run_dir: Path) -> dict:
    steps = STEP.findall(log.read_text(errors="replace"))
    if not steps:
        return {}
    times = tb_scalars(run_dir, "perf/step_time_s")  # the progress line rounds img/s to 0.1
    per_step = [times[int(s[0])] for s in steps if int(s[0]) in times]
    # The first step of a launch carries warm-up (allocations, first gathers); saves land in their steps.
    steady = per_step[1:] or per_step
    return {"seconds_per_step_median": round(float(np.median(steady)), 2), "seconds_per_step": [round(s, 2) for s in per_step],
            "steps_logged": [int(s[0]) for s in steps]}


def kill_one_rank(args: list[str], log: Path, after_step: int, limit: int) -> dict:
    launch = Launch(torchrun(args), log, limit, torchrun=True)
    deadline = time.time() + 3600
    killed_pid = None
    while time.time() < deadline and launch.proc.poll() is None:
        if re.search(rf"^step {after_step}/", launch.text(), re.M) and 1 in launch.watch.rank_pids:
            killed_pid = launch.watch.rank_pids[1]
            os.kill(killed_pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    # torchrun sees rank 1 die and stops rank 0; bounded, then the group is killed.
    code = launch.wait(300)
    logged = [int(s[0]) for s in STEP.findall(launch.text())]
    return {"exit_code": code, "killed_rank_pid": killed_pid, "killed_after_step": after_step,
            "last_step_logged": max(logged, default=0),
            "wall_seconds": round(launch.end - launch.start, 1), **launch.peaks(phases_of(launch.text()))}


def stock_load(export: Path, px: int, log: Path, limit: int) -> dict:
    """Stock open_clip in a fresh process builds the export and encodes a picture and a text."""
    probe = ("import sys, open_clip, torch\n"
             "m, _, pre = open_clip.create_model_and_transforms(sys.argv[1])\n"
             "t = open_clip.get_tokenizer(sys.argv[1])(['a photo'])\n"
             f"i = m.encode_image(torch.zeros(1, 3, {px}, {px}))\n"
             "print('shapes', tuple(i.shape), tuple(m.encode_text(t).shape), 'visual_params',"
             " sum(p.numel() for p in m.visual.parameters()), 'finite', bool(torch.isfinite(i).all()))\n")
    out = run_single([sys.executable, "-c", probe, f"local-dir:{export}"], log, limit, 1200)
    line = next(x for x in log.read_text().splitlines() if x.startswith("shapes"))
    return {**out, "printed": line}


# ---------------------------------------------------------------------------------------------- report

def print_row(row: dict) -> None:
    ranks = row.get("peak_rss_anon_gib", {})
    plan = row.get("planned_peak_rss_anon_gib") or {}
    head = (f"{row['model']} {row['engine']} {row.get('run')} exit {row.get('exit_code')} "
            f"wall {row.get('wall_seconds')} s peak/rank {ranks} GiB planned {plan.get('peak_gib')}")
    print(head, flush=True)
    for name, ph in (row.get("phases") or {}).items():
        if "#" not in name:
            print(f"    {name:8s} {ph['seconds']:8.1f} s  peak/rank {ph['peak_rss_anon_gib']}", flush=True)
    for key in ("export", "versus_offline", "losses_equal", "seconds_per_step_median", "stock_open_clip"):
        if key in row:
            value = row[key]
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in ("phases", "differing", "same_kept_per_block")}
            print(f"    {key}: {value}", flush=True)


def markdown_table(results: dict) -> str:
    """Every row of a results file: phase times and peak RssAnon per rank, with the planner's peak per rank."""
    lines = ["| model | engine | run | phase | time s | peak RssAnon GiB rank 0 / 1 | planned GiB rank 0 / others "
             "| measured / planned |", "|---|---|---|---|---:|---|---|---:|"]

    def pair(values: dict) -> str:
        return " / ".join(f"{v:.2f}" if v is not None else "-" for _, v in sorted(values.items()))

    if "invocations" in results:  # several runs of this script gathered in one file, each with its note
        return "\n\n".join(f"{inv.get('note', '')}\n\n{markdown_table(inv)}" for inv in results["invocations"])
    for part in ("eva", "vitg"):
        for row in (results.get(part) or {}).get("rows", []):
            run = row.get("run", "")
            if part == "eva":
                run = "steps=0" + (" + compensation" if row.get("compensation") else "")
            plan = row.get("planned_peak_rss_anon_gib") or {}
            if plan:
                plan.setdefault("peak_other_ranks", plan["peak_gib"])
            planned = f"{plan['peak_gib']:.2f} / {plan['peak_other_ranks']:.2f}" if plan else "-"
            for name, ph in (row.get("phases") or {}).items():
                if "#" in name or name in ("init", "resume") or (name == "train" and run.startswith("steps=0")):
                    continue
                lines.append(f"| {row['model']} | {row['engine']} | {run} | {name} | {ph['seconds']:.1f} | "
                             f"{pair(ph['peak_rss_anon_gib'])} | | |")
            peaks = row.get("peak_rss_anon_gib") or {}
            ratio = ""
            if plan and peaks:
                want = {k: plan["peak_gib"] if str(k) == "0" else plan["peak_other_ranks"] for k in peaks}
                ratio = " / ".join(f"{peaks[k] / want[k]:.2f}" for k in sorted(peaks))
            status = "" if row.get("exit_code") == 0 else f" (exit {row.get('exit_code')}" + \
                (", memory guard" if row.get("memory_guard_tripped") else "") + ")"
            lines.append(f"| {row['model']} | {row['engine']} | {run} | **whole run**{status} | "
                         f"{row.get('wall_seconds', 0):.1f} | **{pair(peaks)}** | {planned} | {ratio} |")
            if "export" in row and "seconds" in row["export"]:
                ex = row["export"]
                lines.append(f"| {row['model']} | {row['engine']} | {run} | export (1 process) | {ex['seconds']:.1f} | "
                             f"{pair(ex['peak_rss_anon_gib'])} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the same sequence on ViT-Tiny-8 (minutes)")
    parser.add_argument("--only", nargs="+", choices=["eva", "vitg"], default=["eva", "vitg"])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS}; --tiny: required)")
    parser.add_argument("--reuse-eva", type=Path, default=None,
                        help="folder with eva.safetensors, calib/, offline-plain/, offline-comp/ of an earlier run")
    parser.add_argument("--prepare-eva", type=Path, default=None, metavar="DIR",
                        help="only write DIR (created) for --reuse-eva: the EVA checkpoint, calibration shards and the "
                             "offline prunes of --eva-modes (with --ridge), then exit")
    parser.add_argument("--ridge", type=float, default=None,
                        help="compensation ridge relative to the kept units' mean variance, for the in-engine run "
                             "(prune.ridge) and the offline prune (--ridge) alike (default: theirs)")
    parser.add_argument("--table", type=Path, default=None, help="print the markdown table of a results file and exit")
    parser.add_argument("--eva-modes", nargs="+", choices=["plain", "comp"], default=["plain", "comp"],
                        help="EVA part: the prune without and / or with output-mode compensation")
    parser.add_argument("--steps", type=int, default=None,
                        help="ViT-g part: training steps (with --save-every and --kill-after; default the size's)")
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--kill-after", type=int, default=None,
                        help="rank 1 is killed once this step is logged (after the --save-every checkpoint)")
    parser.add_argument("--max-rss-gib", type=float, default=19.0,
                        help="kill a run whose processes together hold more anonymous memory than this")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.tiny and (args.out is None or args.out.resolve() == RESULTS.resolve()):
        parser.error("--tiny needs --out elsewhere than the full-size results")
    out = args.out or RESULTS
    size = TINY if args.tiny else FULL
    lengths = {"steps": args.steps, "save_every": args.save_every, "kill_after_step": args.kill_after}
    size = replace(size, **{k: v for k, v in lengths.items() if v is not None})
    if not 0 < size.save_every < size.kill_after_step < size.steps:
        parser.error(f"need 0 < --save-every < --kill-after < --steps, got {size.save_every}, "
                     f"{size.kill_after_step}, {size.steps}")
    if args.tiny:
        MIN_AVAILABLE["bytes"] = 0
    limit = int(args.max_rss_gib * GIB)
    results: dict = {"size": "tiny" if args.tiny else "full", "settings": vars(size),
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                 "load_average_at_start": os.getloadavg(),
                                 "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
                     "command": "bench/full_size.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _kill_live)
    modes = tuple(mode == "comp" for mode in args.eva_modes)
    if args.prepare_eva is not None:
        args.prepare_eva.mkdir(parents=True)
        start = time.time()
        written, offline = prepare_eva(size, args.prepare_eva, limit, modes, args.ridge)
        results["eva_prepared"] = {"folder": str(args.prepare_eva), "checkpoint": written, "ridge": args.ridge,
                                   "offline_prune": {("comp" if c else "plain"): v[1] for c, v in offline.items()}}
        results["total_seconds"] = round(time.time() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.prepare_eva} and {out} ({results['total_seconds']} s)")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="full_size_bench-", dir=args.workdir))
    start = time.time()
    try:
        if "eva" in args.only:
            results["eva"] = eva_part(size, tmp, args.engines, limit, args.reuse_eva, modes, args.ridge)
        if "vitg" in args.only:
            results["vitg"] = vitg_part(size, tmp, args.engines, limit)
    finally:
        results["total_seconds"] = round(time.time() - start, 1)
        results["machine"]["load_average_at_end"] = os.getloadavg()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        keep = os.environ.get("FULL_SIZE_KEEP")
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
