"""The shared spool: every node's instances in one S3 bucket (cluster mode).

Each node still receives into its own local receive slots (one fsync, as always). Then:

* ``ack_after: shared`` (the default in cluster mode): the instance is uploaded to the bucket
  *before* the C-STORE response; a bucket that cannot be reached answers 0xA700 (out of
  resources) and nothing is acknowledged that only one disk holds;
* ``ack_after: local``: acknowledged after the local fsync, uploaded behind it by the uploader
  thread (faster; what a node had not uploaded yet is lost with its disk).

Object keys are ``<prefix>data/<study>/<sop>~<reception>.dcm``: one per reception, so a
cleanup on one node (deleting the keys it read from the state) can never delete the newer copy
of the same SOP Instance another node has just received. The state row keeps the key; the node
keeps its local copy as a cache (``data/<study>/<sop>.dcm``) until the study is deleted.

``open(inst)`` reads the local copy when this node received it, else the object, downloaded
(streamed, bounded memory) into ``shared-cache/`` once and read from there: every destination
gets a real file (seek, fileno, reopen), as from the local spool.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..common.s3 import describe_failure, fast_put, fast_store, s3_client, transfer_config
from ..dicomfile import UnreadableDataset, identify
from ..state import Instance, State
from .local import Spool, SpoolReader, unlink_quietly
from .note import recorded_as
from .receive import Accepted, Expected, ReceiveFile
from .slots import MARKER_SIZE

log = logging.getLogger("dicomrouter.spool")


ORPHAN_SCAN_EVERY = 600.0  # objects in the shared store no row knows: looked for this often
UPLOAD_BATCH = 64  # ack_after: local: uploads recorded as shared in one transaction

class SharedStoreUnavailable(OSError):
    """The shared store (S3) cannot be reached or refused a write: 0xA700 in ack_after: shared."""


class SharedStore:
    """One bucket and prefix: obstore for the puts when the keys are configured
    (``common.s3.fast_store``), boto3 for the rest."""

    def __init__(self, model: Any) -> None:
        """``model``: the validated ``shared_spool`` (bucket, prefix, endpoint, keys)."""
        self.model = model
        self.bucket = model.bucket
        self.prefix = model.prefix or ""
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        self._client = s3_client(model)
        self._transfer = transfer_config(model)
        self._fast = fast_store(model)  # puts (one per instance) through obstore, if it can

    def describe(self) -> str:
        where = self.model.endpoint_url or "AWS"
        return f"s3://{self.bucket}/{self.prefix} at {where}"

    def put(self, key: str, path: str, size: int) -> None:
        """Upload a spool file under ``key``: its slot marker read as zeros, its reception
        note kept (a node adopting the object reads it: ``adopt_shared_orphans``); the
        nodes read objects through ``SpoolReader`` like their own files."""
        try:
            with SpoolReader(path, hide=MARKER_SIZE) as body:
                if self._fast is not None:
                    fast_put(self._fast, self.prefix + key, body, size, self.model)
                else:
                    self._client.put_object(Bucket=self.bucket, Key=self.prefix + key,
                                            Body=body, ContentLength=size)
        except Exception as exc:
            raise SharedStoreUnavailable(errno.EIO, f"shared store {self.describe()}: "
                                         f"{describe_failure(exc)}") from None

    def download(self, key: str, dest: str) -> None:
        """Stream the object ``key`` into the file ``dest`` (written whole, then renamed)."""
        part = f"{dest}.{uuid.uuid4().hex[:8]}.part"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            with open(part, "wb") as out:
                self._client.download_fileobj(self.bucket, self.prefix + key, out,
                                              Config=self._transfer)
            os.replace(part, dest)
        except Exception as exc:
            unlink_quietly(part)
            if _not_found(exc):
                raise FileNotFoundError(errno.ENOENT, f"not in the shared store: {key}") \
                    from None
            raise SharedStoreUnavailable(errno.EIO, f"shared store {self.describe()}: "
                                         f"{describe_failure(exc)}") from None

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            part = keys[i:i + 1000]
            self._client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": self.prefix + k} for k in part], "Quiet": True})

    def list(self, under: str) -> Iterator[tuple[str, float, int]]:
        """(key below the prefix, modified as Unix time, size) of every object ``under``."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + under)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    yield (obj["Key"][len(self.prefix):], obj["LastModified"].timestamp(),
                           int(obj["Size"]))
        except Exception as exc:
            raise SharedStoreUnavailable(errno.EIO, f"shared store {self.describe()}: "
                                         f"listing failed: {type(exc).__name__}: "
                                         f"{str(exc)[:200]}") from None

    def reachable(self) -> str:
        """'' when the bucket answers, else why not (readiness)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return ""
        except Exception as exc:
            return f"shared store {self.describe()}: {type(exc).__name__}: {str(exc)[:200]}"


def _not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class ClusterSpool(Spool):
    """A node's local spool in front of the shared store (see the module's doc)."""

    def __init__(self, root: Path, state: State, store: SharedStore, ack_after: str,
                 node_id: str, **kwargs: Any) -> None:
        super().__init__(root, state, shared=True, **kwargs)
        self.store = store
        self.ack_after = ack_after
        self.node_id = node_id
        self.cache = root / "shared-cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._uploads: queue.Queue[tuple[str, str, str, int] | None] = queue.Queue()
        self._uploader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._next_orphan_scan = 0.0

    def describe(self) -> str:
        return f"local spool {self.root} in front of the shared spool {self.store.describe()}"

    def health(self) -> str:
        return self.store.reachable()

    def housekeeping(self, state: State) -> None:
        """Also drop local copies of studies another node deleted, and, on one node at a time
        every 10 minutes, adopt objects a node acknowledged but died before recording."""
        super().housekeeping(state)
        self.prune_local()
        if time.monotonic() > self._next_orphan_scan and \
                state.hold_lease("shared-orphans", 900.0):
            self._next_orphan_scan = time.monotonic() + ORPHAN_SCAN_EVERY
            self.adopt_shared_orphans()

    # ---- receiving -------------------------------------------------------------------------

    def new_key(self, tags: dict[str, str]) -> str:
        return (f"data/{tags['StudyInstanceUID']}/{tags['SOPInstanceUID']}"
                f"~{self.node_id}-{uuid.uuid4().hex[:12]}.dcm")

    def accept(self, rx: ReceiveFile, calling_ae: str, called_ae: str,
               command: Expected | None = None) -> Accepted:
        accepted = super().accept(rx, calling_ae, called_ae, command)
        key = self.new_key(accepted.tags)
        if self.ack_after != "shared":
            return Accepted(accepted.path, accepted.tags, accepted.tsuid, accepted.size,
                            calling_ae, called_ae, key, shared=False)
        try:
            self.store.put(key, accepted.path, accepted.size)
        except BaseException:
            unlink_quietly(accepted.path)  # not acknowledged: the sender sends it again
            raise
        return Accepted(accepted.path, accepted.tags, accepted.tsuid, accepted.size,
                        calling_ae, called_ae, key, shared=True)

    def _place(self, src: str | Path, tags: dict[str, str], tsuid: str, calling_ae: str,
               called_ae: str, size: int | None = None, key: str | None = None,
               shared: bool = True) -> bool:
        if key is None:  # adopted at start-up (a slot, an unrecorded file): upload it again
            key, shared = self.new_key(tags), False
        replaced = super()._place(src, tags, tsuid, calling_ae, called_ae, size, key, shared)
        if not shared:
            local = self._local(tags["StudyInstanceUID"], tags["SOPInstanceUID"])
            self._uploads.put((tags["SOPInstanceUID"], key, local,
                               os.stat(local).st_size if size is None else size))
        return replaced

    def _drop_superseded(self, sop_uid: str, old_study: str, new_study: str,
                         old_key: str) -> None:
        """A newer reception replaced ``old_key`` (every re-send here: keys are per
        reception). A move leaves this node's local copy under the old study: removed. The
        old object stays for the moment (another node may be reading it); the shared-orphan
        scan deletes it once it is older than the newer reception (``adopt_shared_orphans``)."""
        if old_study == new_study:
            return
        with self.study_lock(old_study):
            now = self.state.reception(sop_uid)
            if now is not None and now.study_uid == old_study:
                return  # received there again meanwhile: its local copy is that one
            unlink_quietly(self._local(old_study, sop_uid))

    def start(self) -> None:
        super().start()
        for study, sop, key in self.state.unshared():  # left by an earlier run (ack local)
            local = self._local(study, sop)
            with contextlib.suppress(OSError):
                self._uploads.put((sop, key, local, os.stat(local).st_size))
        self._uploader = threading.Thread(target=self._upload_loop, name="shared-upload",
                                          daemon=True)
        self._uploader.start()

    def stop(self) -> None:
        self._stopping.set()
        self._uploads.put(None)
        if self._uploader is not None:
            self._uploader.join(30)
        super().stop()

    def _upload_loop(self) -> None:
        """ack_after: local: upload what was acknowledged, ``transfer_threads`` objects at a
        time, and record a batch of them as shared in one transaction; retry until it works."""
        delay = 0.0
        with ThreadPoolExecutor(max_workers=self.store.model.transfer_threads,
                                thread_name_prefix="shared-put") as pool:
            while True:
                batch, stop = self._next_uploads()
                if batch:
                    failed = self._upload(batch, pool)
                    if failed:
                        delay = min(30.0, max(0.5, delay * 2))
                        for item in failed:
                            self._uploads.put(item)
                        if self._stopping.wait(delay):
                            return
                    else:
                        delay = 0.0
                if stop:
                    return

    def _next_uploads(self) -> tuple[list[tuple[str, str, str, int]], bool]:
        """The next batch (waits for its first item); True once the spool stops."""
        item = self._uploads.get()
        if item is None:
            return [], True
        batch = [item]
        while len(batch) < UPLOAD_BATCH:
            try:
                item = self._uploads.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _upload(self, batch: list[tuple[str, str, str, int]],
                pool: ThreadPoolExecutor) -> list[tuple[str, str, str, int]]:
        """Upload a batch; the items to try again."""
        try:
            current = self.state.current_keys([sop for sop, _k, _l, _s in batch])
        except Exception as exc:
            log.error("uploads to the shared store wait: the state is unavailable (%s: %s)",
                      type(exc).__name__, exc)
            return batch
        # received again (or purged) meanwhile: that reception is superseded, not uploaded
        todo = [b for b in batch if current.get(b[0]) == b[1]]

        def put(item: tuple[str, str, str, int]) -> BaseException | None:
            sop, key, local, size = item
            try:
                self.store.put(key, local, size)
            except FileNotFoundError:
                log.warning("instance %s: local file gone before its upload (replaced or "
                            "purged)", sop)
                return None
            except Exception as exc:  # S3 away: retried
                return exc
            return None

        uploaded: list[tuple[str, str, str, int]] = []
        failed: list[tuple[str, str, str, int]] = []
        for item, exc in zip(todo, pool.map(put, todo), strict=True):
            if exc is None:
                uploaded.append(item)
                continue
            failed.append(item)
            log.error("upload of instance %s to the shared store failed (%s: %s); will retry",
                      item[0], type(exc).__name__, exc)
        try:
            self.state.mark_shared([(sop, key) for sop, key, _l, _s in uploaded])
        except Exception as exc:  # PostgreSQL away: the objects are there, record them again
            log.error("recording %d upload(s) failed (%s: %s); will retry", len(uploaded),
                      type(exc).__name__, exc)
            failed += uploaded
        return failed

    def adopt_orphans(self) -> int:
        """Local files this node has no row for (a crash between rename and record)."""
        adopted = 0
        for path in self.data.glob("*/*.dcm"):
            sop = path.name[:-4]
            try:
                if self.state.instance(sop) is not None:
                    continue
                tags, tsuid = identify(path)
                if path != self.data / tags["StudyInstanceUID"] / f"{tags['SOPInstanceUID']}.dcm":
                    continue
                tags, calling, called = recorded_as(path, tags)  # with its note
                self._place(path, tags, tsuid, calling, called)
                adopted += 1
            except Exception as exc:
                log.error("spool file %s cannot be adopted: %s", path, exc)
        return adopted

    def adopt_shared_orphans(self, min_age: float = 600.0) -> int:
        """Objects no row knows, older than ``min_age``: an instance acknowledged (in the
        bucket) by a node that died, with its disk, before recording it. Recorded from the
        object, so it is routed like any other. Returns how many."""
        known = self.state.all_keys()
        cutoff = time.time() - min_age
        adopted = 0
        for key, modified, size in self.store.list("data/"):
            if key in known or modified > cutoff or not key.endswith(".dcm"):
                continue
            newer = self.state.reception(key.rsplit("/", 1)[-1].split("~", 1)[0])
            if newer is not None and modified <= newer.received_at:
                # an older reception of an instance received again since (re-sent, moved to
                # another study): garbage, never an instance to adopt
                self._delete_objects([key])
                log.info("deleted superseded object %s from the shared store (instance "
                         "received again at %s, now in study %s)", key, time.strftime(
                             "%Y-%m-%d %H:%M:%S", time.localtime(newer.received_at)),
                         newer.study_uid)
                continue
            cached = os.path.join(self.cache, key)
            try:
                self.store.download(key, cached)
                tags, tsuid = identify(cached)
            except (OSError, UnreadableDataset) as exc:
                log.error("shared store object %s cannot be adopted: %s", key, exc)
                continue
            tags, calling, called = recorded_as(cached, tags)  # with its note
            with self.study_lock(tags["StudyInstanceUID"]):
                self.state.record_instance(tags, tsuid, key, size, calling, called, True)
            adopted += 1
            log.warning("adopted instance %s of study %s from the shared store (acknowledged "
                        "by a node that never recorded it)", tags.get("SOPInstanceUID"),
                        tags.get("StudyInstanceUID"))
        return adopted

    # ---- reading -----------------------------------------------------------------------------

    def _local(self, study_uid: str, sop_uid: str) -> str:
        """This node's own copy of an instance it received (``data/<study>/<sop>.dcm``)."""
        return os.path.join(self._data_dir, study_uid, sop_uid + ".dcm")

    def open(self, inst: Instance) -> SpoolReader:
        """The local copy when this node received it; else the shared object (downloaded once
        into shared-cache/, streamed)."""
        if inst.node == self.node_id or not inst.node:
            local = self._local(inst.study_uid, inst.sop_uid)
            if os.path.exists(local):
                return SpoolReader(local)
        cached = os.path.join(self.cache, inst.key)
        if not os.path.exists(cached):
            try:
                self.store.download(inst.key, cached)
            except FileNotFoundError:
                now = self.state.reception(inst.sop_uid)
                if now is not None and now.key == inst.key and now.present and \
                        inst.node and inst.node != self.node_id:
                    # acknowledged by its node (ack_after: local), not uploaded yet: a retry
                    # finds it, this is not a lost instance
                    raise SharedStoreUnavailable(
                        errno.EAGAIN, f"instance {inst.sop_uid} is not in the shared store yet "
                        f"(node {inst.node} uploads it behind its acknowledgement)") from None
                raise
        return SpoolReader(cached)

    # ---- deleting ----------------------------------------------------------------------------

    def delete_delivered(self, study_uid: str, why: str) -> int:
        with self.study_lock(study_uid):
            instances = self.state.forget_delivered(study_uid, why)
            if instances is None:  # not delivered (any more: a late arrival reopened it)
                return 0
            self._delete_objects([i.key for i in instances])
            self._drop_local(study_uid)
        return self._freed(instances)

    def purge(self, study_uid: str) -> int:
        """The objects first, then the rows: a purge that cannot reach the bucket fails and
        keeps the study (an object without a row would be adopted again)."""
        with self.study_lock(study_uid):
            instances = self.state.instances(study_uid)
            try:
                self.store.delete([i.key for i in instances])
            except Exception as exc:
                raise SharedStoreUnavailable(errno.EIO, f"cannot delete the study's objects "
                                             f"from {self.store.describe()}: "
                                             f"{type(exc).__name__}: {exc}") from None
            self.state.purge(study_uid)
            self._drop_local(study_uid)
        return self._freed(instances)

    def _freed(self, instances: list[Instance]) -> int:
        """Take deleted instances off the spool's byte count; returns their bytes."""
        freed = sum(i.size for i in instances)
        with self._bytes_lock:
            self._bytes = max(0, self._bytes - freed)
        return freed

    def _delete_objects(self, keys: list[str]) -> None:
        try:
            self.store.delete(keys)
        except Exception as exc:  # the rows are absent already: garbage, not data
            log.error("could not delete %d object(s) from the shared store (%s: %s); they stay "
                      "as garbage (their rows are marked deleted, so they are never adopted)",
                      len(keys), type(exc).__name__, exc)

    def _drop_local(self, study_uid: str) -> None:
        shutil.rmtree(self.data / study_uid, ignore_errors=True)
        shutil.rmtree(self.cache / "data" / study_uid, ignore_errors=True)

    def prune_local(self, older_than: float = 60.0) -> int:
        """Local copies and cached objects of studies no longer in the spool (another node
        delivered and deleted them); returns how many study folders went."""
        pruned = 0
        cutoff = time.time() - older_than
        for folder in (self.data, self.cache / "data"):
            if not folder.is_dir():
                continue
            for study_dir in folder.iterdir():
                try:
                    if study_dir.stat().st_mtime > cutoff:
                        continue
                    with self.study_lock(study_dir.name):
                        row = self.state.study(study_dir.name)
                        if row is not None and row.in_spool:
                            continue
                        shutil.rmtree(study_dir, ignore_errors=True)
                        pruned += 1
                except OSError:
                    continue
        return pruned
