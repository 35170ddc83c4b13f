"""Data at scale: store formats, flat host memory as the data grows, loader vs train step.

  python benchmarks/bench_data_scale.py --store --documents=200000
  python benchmarks/bench_data_scale.py --rss --documents=250000 --growth=8
  python benchmarks/bench_data_scale.py --loader --steps=30
  python benchmarks/bench_data_scale.py --chats=25000 --growth=1,8,32
  python benchmarks/bench_data_scale.py --chats=7000 --growth=1,8,32 --num_workers=2

--store writes the same synthetic tokenized documents (lengths 20-300 tokens) as the
memory-mapped store (sft_jax.data.store: raw arrays + offsets index), as ArrayRecord (one
record per document, tokens and trained flags as bytes) and as Parquet (list<int32> and
list<bool> columns, row groups of 1,000); reports write MB/s and random single-document reads
per second (the access a per-process loader makes), and Grain's MapDataset shuffle/mix against
sft_jax.data.stream.index_shuffle per index (why the loader computes its own stream).

--rss writes stores of N and growth x N synthetic documents and, for each, runs a fresh
process that streams 200 global batches of 64 x 2048 tokens from it (loader="stream") and
reports its peak resident memory; the same for loader="memory" (all documents in memory,
packed per epoch) for contrast. Flat means the stream figure changes < 10% across sizes.

--chats=N writes N x growth synthetic chats (JSONL, 1-3 user/assistant turns, ~310 bytes
each) for each growth factor and, for each, runs a fresh process that does the trainer's data
side with loader="stream" from scratch: open_run_data on configs/base.py (tokenizing into a new
store with the demo tokenizer), then 200 global batches; reports the peak resident memory of
that process and its children together (sampled every 50 ms), and each phase's seconds.

--loader runs the demo (configs/base.py, loader="stream") for --steps steps and reads its
train/tokens_per_sec from metrics.jsonl, then times the same loader alone (tokens of rows
made per second); prints the ratio. On a GPU: the same command, the demo then runs there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sft_jax.core.spec import RunSpec
from sft_jax.data import store, stream
from sft_jax.data.batches import TrainBatches
from sft_jax.data.tokenize import Tokenized, empty_stats
from sft_jax.train.setup import open_run_data

REPO = Path(__file__).resolve().parents[1]
PART = 100_000  # documents generated and appended at a time


def synthetic_parts(count: int, seed: int = 0):
    """Tokenized parts of `count` random documents (20-300 tokens, half trained)."""
    rng = np.random.default_rng(seed)
    for start in range(0, count, PART):
        n = min(PART, count - start)
        lengths = rng.integers(20, 300, n)
        tokens = rng.integers(3, 32000, int(lengths.sum()), dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        yield Tokenized(tokens, rng.random(len(tokens)) < 0.5, offsets, empty_stats())


def write_store(root: Path, count: int) -> Tokenized:
    writer = store.StoreWriter(root, f"n{count}")
    for part in synthetic_parts(count):
        writer.append(part)
    writer.close(empty_stats())
    return store.open_store(root, f"n{count}")


def time_formats(root: Path, count: int, reads: int = 20_000) -> dict:
    """Write MB/s and random document reads/s of the store, ArrayRecord and Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module as ar

    parts = list(synthetic_parts(count))
    megabytes = sum(p.tokens.nbytes + p.trained.nbytes for p in parts) / 2**20
    picks = np.random.default_rng(1).integers(0, count, reads)
    out = {}

    start = time.perf_counter()
    mapped = write_store(root, count)
    write = time.perf_counter() - start
    start = time.perf_counter()
    for i in picks:
        tokens, trained = mapped.document(int(i))
        np.asarray(tokens).sum(), np.asarray(trained).sum()
    out["store"] = (megabytes / write, reads / (time.perf_counter() - start))

    start = time.perf_counter()
    writer = ar.ArrayRecordWriter(str(root / "docs.array_record"), "group_size:1")
    for part in parts:
        for d in range(len(part)):
            tokens, trained = part.document(d)
            writer.write(tokens.tobytes() + np.packbits(trained).tobytes())
    writer.close()
    write = time.perf_counter() - start
    reader = ar.ArrayRecordReader(str(root / "docs.array_record"))
    start = time.perf_counter()
    for i in picks:
        record = reader.read([int(i)])[0]
        np.frombuffer(record[: len(record) // 33 * 32], np.int32).sum()
    out["ArrayRecord"] = (megabytes / write, reads / (time.perf_counter() - start))
    reader.close()

    start = time.perf_counter()
    with pq.ParquetWriter(root / "docs.parquet", _parquet_schema(pa)) as parquet:
        for part in parts:
            docs = [part.document(d) for d in range(len(part))]
            parquet.write_table(pa.table({"tokens": [t for t, _ in docs],
                                          "trained": [m for _, m in docs]}),
                                row_group_size=1000)  # fmt: skip
    write = time.perf_counter() - start
    parquet = pq.ParquetFile(root / "docs.parquet", memory_map=True)
    start = time.perf_counter()
    for i in picks[: reads // 20]:  # a row group decoded per document: 20x fewer reads
        group = parquet.read_row_group(int(i) // 1000, columns=["tokens"])
        np.asarray(group.column("tokens")[int(i) % 1000].values).sum()
    out["Parquet"] = (megabytes / write, reads / 20 / (time.perf_counter() - start))
    return {"megabytes": megabytes, "formats": out}


def _parquet_schema(pa):
    return pa.schema([("tokens", pa.list_(pa.int32())), ("trained", pa.list_(pa.bool_()))])


def time_index_streams(count: int = 100_000, reads: int = 2_000) -> dict:
    """Seconds per index: Grain's shuffle and mix (random access) vs index_shuffle (vectorised)."""
    import grain

    shuffled = grain.MapDataset.range(count).shuffle(seed=0).repeat(None)
    small = grain.MapDataset.range(50).shuffle(seed=1).repeat(None)
    mixed = grain.MapDataset.mix([shuffled, small], [0.9, 0.1])
    timings = {}
    for name, dataset in (("grain shuffle", shuffled), ("grain mix", mixed)):
        start = time.perf_counter()
        for i in range(reads):
            dataset[i]
        timings[name] = (time.perf_counter() - start) / reads
    start = time.perf_counter()
    stream.index_shuffle(np.arange(count), count, (0, 0, 0))
    timings["index_shuffle"] = (time.perf_counter() - start) / count
    return timings


def peak_rss_child(root: Path, key: str, loader: str, batches: int = 200) -> dict:
    """Resident MiB of a fresh process: after its imports, then peak and current after
    streaming `batches` global batches (the imports' own peak can hide the data's)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from bench_data_scale import consume, resident; print(*resident()); "
        f"consume({str(root)!r}, {key!r}, {loader!r}, {batches}); print(*resident())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    numbers = [float(x) for x in out.stdout.split()[-4:]]
    return {"imports": numbers[1], "peak": numbers[2], "current": numbers[3]}


def resident() -> tuple[float, float]:
    """(peak, current) resident MiB of this process."""
    status = Path("/proc/self/status").read_text()
    current = int(status.split("VmRSS:")[1].split()[0]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, current


def consume(root: str, key: str, loader: str, batches: int) -> None:
    """What a training process's data side does: open the data, make `batches` batches."""
    documents = store.open_store(Path(root), key)
    rows = dict(global_rows=64, row_len=2048, packing=True, seed=0, shuffle=True)
    if loader == "memory":  # the in-memory path: every document loaded, epochs packed whole
        documents = Tokenized(np.array(documents.tokens), np.array(documents.trained),
                              np.array(documents.offsets), documents.stats)  # fmt: skip
        source = TrainBatches(documents, max_docs=64, **rows)
    else:
        source = stream.StreamBatches(stream.Documents([documents]), [1.0], window=8192,
                                      max_docs=64, **rows)  # fmt: skip
    for _ in range(batches):
        next(source)


def write_chats(path: Path, count: int, seed: int = 0) -> None:
    """`count` synthetic chats of 1-3 turns, sums with filler words, as JSONL."""
    rng = np.random.default_rng(seed)
    words = np.array(
        [
            "alpha",
            "beta",
            "gamma",
            "delta",
            "sort",
            "add",
            "count",
            "reverse",
            "letters",
            "numbers",
            "plus",
        ]
    )
    with open(path, "w") as f:
        for _ in range(count):
            messages = []
            for _ in range(int(rng.integers(1, 4))):
                a, b = (int(x) for x in rng.integers(0, 100, 2))
                ask = " ".join(rng.choice(words, int(rng.integers(2, 12))))
                say = " ".join(rng.choice(words, int(rng.integers(1, 8))))
                messages += [{"role": "user", "content": f"Add {a} and {b}. {ask}"},
                             {"role": "assistant", "content": f"{a + b} {say}"}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")


def consume_chats(train_file: str, cache_dir: str, batches: int, workers: int = 0) -> None:
    """The trainer's data side from scratch (tokenize into a store, open it), then `batches`
    global batches; prints the seconds of each. workers: config.data.num_workers (0: auto)."""
    config = _demo_config(cache_dir)
    config.data.update(train_files=train_file, eval_files="", num_workers=workers)
    start = time.perf_counter()
    source = open_run_data(RunSpec.of(config))
    opened = time.perf_counter()
    for _ in range(batches):
        next(source.train_batches)
    print(opened - start, time.perf_counter() - opened)


def tree_rss(pid: int) -> float:
    """Resident MiB of a process and all its descendants now (0 once it is gone).

    A child forked but not yet exec'd (a spawned worker's first milliseconds: Python forks
    with vfork, sharing the parent's memory) reports the parent's resident pages as its own:
    it is skipped, known by its command line still being its parent's (read before its memory,
    so a child that execs between the two reads is counted as the new program)."""
    total, pending = 0.0, [(pid, b"")]
    while pending:
        child, parent_command = pending.pop()
        proc = Path(f"/proc/{child}")
        try:
            command = proc.joinpath("cmdline").read_bytes()
            status = proc.joinpath("status").read_text()
            if command != parent_command:
                total += int(status.split("VmRSS:")[1].split()[0]) / 1024
            for task in proc.joinpath("task").iterdir():
                children = task.joinpath("children").read_text().split()
                pending += [(int(c), command) for c in children]
        except (OSError, IndexError):
            continue  # exited meanwhile (or a zombie, which holds no memory)
    return total


def chats_peak_rss(root: Path, chats: int, batches: int = 200, workers: int = 0) -> dict:
    """Peak resident MiB of the process tree doing consume_chats on `chats` synthetic chats."""
    train_file = root / f"chats{chats}.jsonl"
    write_chats(train_file, chats)
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from bench_data_scale import consume_chats; "
        f"consume_chats({str(train_file)!r}, {str(root / f'cache{chats}')!r}, {batches}, "
        f"{workers})"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    peak = 0.0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.05)
    out = child.stdout.read().split()
    if child.returncode:
        raise RuntimeError(f"consume_chats on {chats} chats failed ({child.returncode})")
    train_file.unlink()
    return {"peak_tree_mib": peak, "open_seconds": float(out[-2]), "batch_seconds": float(out[-1])}


def chats_table(root: Path, chats: int, growth: list[int], workers: int = 0) -> dict:
    figures = {}
    for factor in growth:
        figure = figures[factor * chats] = chats_peak_rss(root, factor * chats, workers=workers)
        first = next(iter(figures.values()))["peak_tree_mib"]
        print(f"x{factor:<3} {factor * chats:>9,} chats: peak RSS of the process tree "
              f"{figure['peak_tree_mib']:,.0f} MiB ({figure['peak_tree_mib'] / first:.2f}x "
              f"x1's); tokenize + open {figure['open_seconds']:.0f} s, "
              f"200 batches {figure['batch_seconds']:.1f} s", flush=True)  # fmt: skip
    return figures


def loader_ratio(steps: int, batches: int = 200) -> dict:
    """The demo's train tokens/s (its metrics) and the stream loader's alone, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"--config.train.steps={steps}", "--config.data.loader=stream",
            "--config.eval.every_steps=0", "--config.eval.at_start=False",
            "--config.checkpoint.enabled=False", "--config.export.at_end=none",
            f"--config.data.cache_dir={tmp}/cache", "--config.log.every_steps=1",
        ]  # fmt: skip
        subprocess.run([sys.executable, str(REPO / "main.py"), "--config=configs/base.py",
                        f"--workdir={tmp}/run", *overrides], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        rates = [
            r["train/tokens_per_sec"] for r in map(json.loads, lines) if "train/tokens_per_sec" in r
        ][2:]  # fmt: skip (the first steps compile)
        config = _demo_config(f"{tmp}/cache")
        source = open_run_data(config)  # the store the demo wrote: no tokenizing here
        next(source.train_batches)
        start = time.perf_counter()
        for _ in range(batches):
            next(source.train_batches)
        seconds = time.perf_counter() - start
    loader = batches * config.train.global_batch_size * config.data.max_length / seconds
    step = statistics.median(rates)
    return {"loader_tokens_per_sec": loader, "step_tokens_per_sec": step, "ratio": loader / step}


def _demo_config(cache_dir: str):
    spec = importlib.util.spec_from_file_location("base_config", REPO / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.update(loader="stream", cache_dir=cache_dir)
    return config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", action="store_true")
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--loader", action="store_true")
    parser.add_argument("--documents", type=int, default=250_000)
    parser.add_argument("--growth", default="8", help="--rss: one factor; --chats: a list")
    parser.add_argument("--chats", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--num_workers", type=int, default=0, help="--chats: config.data.num_workers (0: auto)"
    )
    args = parser.parse_args()
    out: dict = {}  # every part's figures, printed as one JSON line at the end
    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            result = time_formats(Path(tmp), args.documents)
            print(f"{args.documents} documents, {result['megabytes']:.0f} MB of tokens + flags")
            print(f"{'format':>14} {'write MB/s':>11} {'random reads/s':>15}")
            for name, (write, reads) in result["formats"].items():
                print(f"{name:>14} {write:>11,.0f} {reads:>15,.0f}")
            streams = time_index_streams()
            for name, seconds in streams.items():
                print(f"{name:>14}: {seconds * 1e6:,.2f} us per index")
            out["store"] = {**result, "index_seconds": streams}
        if args.rss:
            out["rss"] = rss_table(Path(tmp), args.documents, int(args.growth))
        if args.chats:
            growth = [int(g) for g in args.growth.split(",")]
            out["chats"] = chats_table(Path(tmp), args.chats, growth, args.num_workers)
    if args.loader:
        out["loader"] = loader_ratio(args.steps)
    print(json.dumps(out))


def rss_table(root: Path, documents: int, growth: int) -> dict:
    sizes = (documents, documents * growth)
    for size in sizes:
        write_store(root, size)
    figures = {(loader, size): peak_rss_child(root, f"n{size}", loader)
               for loader in ("stream", "memory") for size in sizes}  # fmt: skip
    for loader in ("stream", "memory"):
        small, large = figures[(loader, sizes[0])], figures[(loader, sizes[1])]
        print(
            f"{loader:>7}: at {sizes[0]:,} -> {sizes[1]:,} documents: peak RSS "
            f"{small['peak']:,.0f} -> {large['peak']:,.0f} MiB "
            f"({large['peak'] / small['peak'] - 1:+.1%}), RSS after the batches "
            f"{small['current']:,.0f} -> {large['current']:,.0f} MiB "
            f"({large['current'] / small['current'] - 1:+.1%}); after the imports alone "
            f"{small['imports']:,.0f} MiB"
        )
    return {f"{loader} {size}": figure for (loader, size), figure in figures.items()}


if __name__ == "__main__":
    main()
