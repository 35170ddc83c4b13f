"""A WORKDIR in a bucket (s3://, gs://): the run works in a local staging copy, mirrored up.

Orbax 0.12.8 cannot write checkpoint arrays to s3:// (its TensorStore specs send only gs:// to a
remote driver: tensorstore_utils.py l.213-222), so a run whose --workdir, checkpoint.init_from or
export directory is a bucket URL works in a local staging directory, ROOT/<bucket>/<path> (ROOT:
config.checkpoint.staging_dir, default $TMPDIR/sft_jax_staging), with the layout of a local
WORKDIR. A checkpoint step, once Orbax has finalized it, is uploaded file by file and then its
MARKER, which lists the files and their sizes: a reader takes only steps with a marker and
downloads exactly the files it lists, so a partly uploaded step is never restored. The bucket
keeps the steps the local manager keeps (keep_last, keep_best). metrics.jsonl and tensorboard/
go up after each step, the export when it is complete; the bucket's layout is a WORKDIR's.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from sft_jax.data import cloud
from sft_jax.data.cloud import CloudError, is_remote
from sft_jax.workdir import rundir
from sft_jax.workdir.checkpointing import committed_steps

log = logging.getLogger(__name__)
MARKER = "sft_jax_complete.json"  # written last into a step's folder: {"files": {name: bytes}}
RUN_FILE = "sft_jax_run.json"  # written when a run starts: the bucket path holds a run
DEFAULT_ROOT = "sft_jax_staging"  # under the system's temporary directory
_IN_FLIGHT = (".partial", ".download")  # local folders being written: never uploaded


def staging_dir(url: str, root: str = "") -> Path:
    """The local copy of the bucket path `url`: ROOT/<bucket>/<path>."""
    base = Path(root).expanduser() if root else Path(tempfile.gettempdir()) / DEFAULT_ROOT
    return base.absolute() / url.split("://", 1)[1].strip("/")


class BucketMirror:
    """The bucket path `url` and its local staging copy; every transfer goes through cloud."""

    def __init__(self, url: str, root: str = ""):
        self.url = url.rstrip("/")
        self.staging = staging_dir(url, root)
        self._pushed: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) when uploaded

    @classmethod
    def open(cls, url: str, root: str, field: str) -> BucketMirror:
        """The mirror of `url` once its bucket answers: a missing bucket or credentials that
        cannot list it are a CloudError naming `field` and the path, before anything is made."""
        try:
            cloud.check_bucket(url)
        except CloudError as e:
            raise CloudError(f"{field}={url}: {e}") from None
        return cls(url, root)

    def remote(self, local: Path) -> str:
        """The URL of a path inside the staging directory."""
        relative = Path(local).absolute().relative_to(self.staging).as_posix()
        return self.url if relative == "." else f"{self.url}/{relative}"

    # --- A training run -----------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return rundir.checkpoints_path(self.staging)

    @property
    def _run_files_skip(self) -> set[str]:
        """Top-level names that are not pushed as files: the lock, the checkpoint folders
        (steps go up with their markers; damaged ones stay local), the export (whole, at its
        end)."""
        names = {rundir.LOCK_FILE, RUN_FILE, rundir.export_dir(self.staging).name}
        return names | {p.name for p in self.staging.glob(self.checkpoints.name + "*")}

    def pull_run(self) -> None:
        """Before a run: the bucket's complete steps (and its metrics, where it went further)
        into the staging copy; local steps a killed or failed upload left go up first.

        RUN_FILE is written first (so a bucket the credentials may read but not write stops
        the run now, not at its first checkpoint). Where the bucket path had none, no run was
        ever there (or it was deleted): a staging copy left from an earlier run of that path
        is removed, not resumed from.
        """
        if RUN_FILE not in cloud.list_tree(self.url):
            self._forget_staging()
        started = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()}
        cloud.write_text(f"{self.url}/{RUN_FILE}", json.dumps(started))
        newer = self.pull_steps(self.checkpoints, upload_newer=True)
        self.pull_files(self._run_files_skip | {self.checkpoints.name}, replace=newer)

    def _forget_staging(self) -> None:
        if not self.staging.is_dir():
            return
        stale = [p for p in self.staging.iterdir() if p.name != rundir.LOCK_FILE]
        if stale:
            log.warning(
                "%s holds no run: removing the staging copy of an earlier one in %s",
                self.url,
                self.staging,
            )
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def publish(self, step_dir: Path, kept: list[int]) -> None:
        """After Orbax finalized a step (Checkpoints calls it in its upload thread): the step,
        then the bucket pruned to the steps kept locally, then metrics and TensorBoard files."""
        run = cloud.list_tree(self.url)  # one listing serves the three
        steps = _under(run, self.remote(step_dir.parent).removeprefix(self.url + "/"))
        self.upload_step(step_dir, steps)
        self.prune(step_dir.parent, kept, steps)
        self.push_files(self._run_files_skip, run)

    def push_run(self) -> None:
        """The run's last metrics and TensorBoard files (after its last checkpoint)."""
        self.push_files(self._run_files_skip)

    # --- Checkpoint steps -------------------------------------------------------------------

    def complete_steps(self, directory: Path) -> dict[int, dict[str, int]]:
        """The bucket's steps under `directory` whose marker is written: step -> its files."""
        remote = self.remote(directory)
        markers = [name for name in cloud.list_tree(remote) if _is_marker(name)]
        return {
            int(name.split("/")[0]): json.loads(cloud.read_text(f"{remote}/{name}"))["files"]
            for name in markers
        }

    def upload_step(self, step_dir: Path, listing: dict[str, int] | None = None) -> None:
        """Uploads a finalized step, its marker last (an earlier marker of it removed first).
        `listing`: the bucket's objects under the step's parent, where the caller has it."""
        remote = self.remote(step_dir)
        if listing is None:
            listing = cloud.list_tree(self.remote(step_dir.parent))
        if f"{step_dir.name}/{MARKER}" in listing:  # saved again: unmarked, then replaced
            cloud.delete([f"{remote}/{MARKER}"])
        files = {
            path.relative_to(step_dir).as_posix(): path.stat().st_size
            for path in sorted(step_dir.rglob("*"))
            if path.is_file()
        }
        cloud.put_files([(step_dir / name, f"{remote}/{name}") for name in files])
        cloud.write_text(f"{remote}/{MARKER}", json.dumps({"files": files}, indent=1))
        log.info("uploaded checkpoint %s to %s", step_dir.name, remote)

    def download_step(self, step_dir: Path, files: dict[str, int]) -> None:
        """Downloads the files a step's marker lists; the step appears locally only whole."""
        partial = step_dir.with_name(step_dir.name + ".download")
        shutil.rmtree(partial, ignore_errors=True)
        remote = self.remote(step_dir)
        cloud.get_files([(f"{remote}/{name}", partial / name) for name in files])
        wrong = [name for name, size in files.items() if (partial / name).stat().st_size != size]
        if wrong:
            raise CloudError(f"{remote}: {wrong[0]} differs in size from its marker {MARKER}.")
        shutil.rmtree(step_dir, ignore_errors=True)
        partial.rename(step_dir)

    def prune(
        self, directory: Path, keep: Iterable[int], listing: dict[str, int] | None = None
    ) -> None:
        """Deletes the bucket's steps (complete or partial) that are not in `keep`, each one's
        marker first: a reader never sees a marked step with files missing."""
        remote, keep = self.remote(directory), set(keep)
        doomed: dict[str, list[str]] = defaultdict(list)
        for name in cloud.list_tree(remote) if listing is None else listing:
            step = name.split("/")[0]
            if step.isdigit() and int(step) not in keep:
                doomed[step].append(name)
        for step, names in doomed.items():
            names.sort(key=lambda name: name != f"{step}/{MARKER}")
            cloud.delete([f"{remote}/{name}" for name in names])

    def pull_steps(self, directory: Path, upload_newer: bool) -> bool:
        """Makes the local steps under `directory` the bucket's complete ones; True where the
        bucket had a newer step than the staging copy (the run went on elsewhere).

        Local steps newer than the bucket's newest are complete checkpoints whose upload failed
        or was killed: uploaded now when `upload_newer`, else left where they are. Older local
        steps the bucket no longer keeps are deleted; missing or differing ones downloaded.
        """
        remote = self.complete_steps(directory)
        local = committed_steps(directory)
        newest = max(remote, default=-1)
        for step in local:
            if step > newest:
                if upload_newer:
                    log.warning(
                        "step %d in %s was never uploaded: uploading it now", step, directory
                    )
                    self.upload_step(directory / str(step))
            elif step not in remote:
                shutil.rmtree(directory / str(step))
        for step, files in remote.items():
            if not _same_files(directory / str(step), files):
                self.download_step(directory / str(step), files)
        return newest > max(local, default=-1)

    # --- Metrics, TensorBoard, export -------------------------------------------------------

    def push_files(self, skip: Iterable[str], listing: dict[str, int] | None = None) -> None:
        """Uploads the staging directory's files outside `skip` (top-level names) that changed
        since this process uploaded them or that the bucket lacks (`listing`: the run's)."""
        remote, skip = cloud.list_tree(self.url) if listing is None else listing, set(skip)
        pairs = []
        for path in _files(self.staging, skip):
            relative = path.relative_to(self.staging).as_posix()
            stat = path.stat()
            seen = (stat.st_size, stat.st_mtime_ns)
            pushed = self._pushed.get(path)
            if (pushed != seen) if pushed else (remote.get(relative) != seen[0]):
                pairs.append((path, f"{self.url}/{relative}"))
                self._pushed[path] = seen
        cloud.put_files(pairs)

    def pull_files(self, skip: Iterable[str], replace: bool) -> None:
        """Downloads the bucket's files outside `skip` that the staging copy lacks (all that
        differ in size where `replace`: the bucket's run went further than this copy)."""
        skip = set(skip)
        pairs = []
        for relative, size in cloud.list_tree(self.url).items():
            local = self.staging / relative
            if relative.split("/")[0] in skip or relative.endswith(_IN_FLIGHT):
                continue
            if not local.exists() or (replace and local.stat().st_size != size):
                pairs.append((f"{self.url}/{relative}", local))
        cloud.get_files(pairs)


def upload_tree(local: Path, url: str) -> None:
    """Uploads a complete folder (an export) to `url`, deleting what else the bucket had there."""
    files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}
    stale = [f"{url}/{name}" for name in cloud.list_tree(url) if name not in files]
    cloud.delete(stale)
    cloud.put_files([(path, f"{url}/{name}") for name, path in files.items()])
    log.info("uploaded %s to %s", local, url)


def readable_run(workdir: str | Path, root: str = "", field: str = "--workdir") -> Path:
    """A run's WORKDIR to read checkpoints from: itself when local; for a bucket URL, its
    staging copy with the bucket's complete steps downloaded (under the run lock)."""
    if not is_remote(str(workdir)):
        return Path(workdir)
    mirror = BucketMirror.open(str(workdir), root, field)
    with rundir.lock(mirror.staging):  # process 0 pulls (the staging copy is shared)
        if jax.process_index() == 0:
            mirror.pull_steps(rundir.checkpoints_path(mirror.staging), upload_newer=False)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"sft_jax: {workdir} pulled")
    return mirror.staging


def _under(listing: dict[str, int], prefix: str) -> dict[str, int]:
    """The part of a listing under `prefix`, relative to it."""
    start = prefix + "/"
    return {
        name.removeprefix(start): size for name, size in listing.items() if name.startswith(start)
    }


def _is_marker(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and parts[0].isdigit() and parts[1] == MARKER


def _same_files(step_dir: Path, files: dict[str, int]) -> bool:
    return all(
        (step_dir / n).is_file() and (step_dir / n).stat().st_size == s for n, s in files.items()
    )


def _files(root: Path, skip: set[str]) -> list[Path]:
    if not root.is_dir():
        return []
    return [
        path
        for top in sorted(root.iterdir())
        if top.name not in skip and not top.name.endswith(_IN_FLIGHT)
        for path in ([top] if top.is_file() else sorted(top.rglob("*")))
        if path.is_file()
    ]
