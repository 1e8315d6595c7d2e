"""Reading WebDataset shards: shard lists, per-rank splits, and samples that never crash a job.

Why not ``webdataset.WebDataset`` for the reading itself: in webdataset 1.0.2 the tar iterator
relies on ``tarfile``'s stream mode, which ends iteration *silently* when a header is truncated
or garbage, so a cut-off shard loses its tail with no error and a half-read sample is passed on
without its missing members. Here each shard is read with ``tarfile`` plus a check of why the
stream ended, members are grouped into samples with webdataset's own key rule
(``base_plus_ext``), and every failure becomes an ``ErrorRecord``:

- a shard that cannot be opened, or is not a tar: one record, key ``""``;
- a shard that is truncated or corrupt part-way: the samples before the damage are yielded and
  one record names the shard and, as its key, the sample that was lost. A sample whose member
  data is cut is lost. When a member *header* is cut or garbage, the next key is unknown: the
  sample read last is yielded if it has every member the sample before it had, else it is lost
  (the key is ``""`` when no sample was lost);
- a sample with no image member, an undecodable image, a bad ``.cls`` or ``.json``, or a
  duplicated member: one record for that sample, which is not yielded.
"""
from __future__ import annotations

import glob
import json
import logging
import operator
import os
import tarfile
from dataclasses import dataclass
from typing import IO, Collection, Iterator, Sequence

import fsspec
from braceexpand import braceexpand
from PIL import Image
from webdataset.autodecode import IMAGE_EXTENSIONS
from webdataset.tariterators import base_plus_ext

from pipeline.data.errors import ErrorLog, ErrorRecord
from pipeline.data.images import ImageDecodeError, decode

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)


@dataclass
class Sample:
    """One decoded sample: ``image`` is RGB (None when not decoded), ``cls``/``meta`` None when absent."""

    key: str
    shard: str
    image: Image.Image | None
    cls: int | None
    meta: dict | None


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec into an ordered list of shard paths or URLs, duplicates removed.

    ``spec`` is a path, a brace pattern (``data/shard-{000000..000009}.tar``), a local directory
    (its ``*.tar`` files, sorted), a glob, an fsspec URL (``s3://``, ``gs://``, ``file://``,
    ``memory://``; globs and directories listed with fsspec), or a list of any of these.
    Local files must exist (``FileNotFoundError`` names the missing ones); remote ones are not
    checked here, since that costs a request per shard, and fail when read. An empty result
    raises ``ValueError``.
    """
    items = [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(s) for s in spec]
    shards: list[str] = []
    missing: list[str] = []
    for item in items:
        for pattern in braceexpand(item):
            if "://" in pattern:
                shards += _expand_url(pattern)
            elif _GLOB_CHARS & set(pattern):
                shards += sorted(glob.glob(pattern))
            elif os.path.isdir(pattern):
                shards += sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar")))
            elif os.path.isfile(pattern):
                shards.append(pattern)
            else:
                missing.append(pattern)
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(f"shard files not found: {', '.join(missing[:10])}{more} (from {spec!r})")
    if not shards:
        raise ValueError(f"no shards match {spec!r}")
    return list(dict.fromkeys(shards))


def _expand_url(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    if _GLOB_CHARS & set(path):
        return [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]
    # Only a name that does not look like a shard is asked whether it is a directory: one
    # request per URL would be paid on every shard of a long brace pattern otherwise.
    if not path.endswith(_TAR_SUFFIXES) and fs.isdir(path):
        return [fs.unstrip_protocol(p) for p in sorted(fs.glob(path.rstrip("/") + "/*.tar"))]
    return [url]


def split_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards of ``rank`` out of ``world_size``: round-robin, ``shards[rank::world_size]``.

    Every shard goes to exactly one rank; a rank may get none when there are fewer shards.
    """
    world_size, rank = operator.index(world_size), operator.index(rank)
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(shards)[rank::world_size]


def iter_samples(
    shards: Sequence[str], errors: ErrorLog, stage: str = "read",
    decode_image: bool | Collection[str] = True,
) -> Iterator[Sample]:
    """Yield the samples of ``shards`` in order; record every failure in ``errors`` and go on.

    See the module docstring for what is recorded. With ``decode_image=False`` an image member
    must still be present, but ``Sample.image`` is None; with a collection of keys only those
    samples' images are decoded (a stage that needs a few images of a shard).
    """
    if isinstance(shards, (str, os.PathLike)):
        raise TypeError(f"shards must be a list of shards, got {shards!r}: expand it with expand_shards()")
    return (sample for shard in list(shards) for sample in _iter_shard(shard, errors, stage, decode_image))


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Remembers why a tar stream ended: ``tarfile`` stops silently on a bad or missing header."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf.stop_reason = exc
            raise


def _open(shard: str) -> IO[bytes]:
    if "://" in shard:
        return fsspec.open(shard, "rb").open()
    return open(shard, "rb")


class _MemberReadError(tarfile.ReadError):
    """The data of ``member`` could not be read (its header could)."""

    def __init__(self, member: str, cause: Exception):
        super().__init__(f"cannot read member {member!r}: {cause!r}")
        self.member = member


def _tar_members(fileobj: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member; raises ``tarfile.ReadError`` if the archive is cut short."""
    tf = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndCheckingTarInfo)
    for info in tf:
        if info.isreg():
            try:
                data = tf.extractfile(info).read()
            except Exception as exc:
                raise _MemberReadError(info.name, exc) from exc
            yield info.name, data
        tf.members = []  # stream mode keeps every header otherwise
    stop = getattr(tf, "stop_reason", None)
    # A complete archive ends at a zero block; anything else means it was cut off or damaged.
    if not isinstance(stop, tarfile.EOFHeaderError):
        raise tarfile.ReadError(f"no end-of-archive block ({stop or 'end of data'})")


def _iter_shard(shard: str, errors: ErrorLog, stage: str,
                decode_image: bool | Collection[str]) -> Iterator[Sample]:
    # The sample being grouped: its key, members by extension, and problems found so far;
    # `expected` is the member set of the previous sample, to judge one cut short by damage.
    key, members, problems, expected, last = "", {}, [], None, None
    try:
        with _open(shard) as f:
            for name, data in _tar_members(f):
                last = name
                prefix, ext = base_plus_ext(name)
                if prefix is None:
                    _record(errors, stage, shard, name, f"member {name!r} has no extension, belongs to no sample")
                    continue
                if prefix != key and members:
                    yield from _finish(shard, key, members, problems, errors, stage, decode_image)
                    expected, members, problems = set(members), {}, []
                key, ext = prefix, ext.lower()
                if ext in members:
                    problems.append(f"duplicate member {name}")
                members[ext] = data
    # Any failure of the storage, the file or the tar format ends this shard only, by design.
    except Exception as exc:
        if isinstance(exc, _MemberReadError):
            # A member of a later sample means the pending one had ended, so it is whole.
            lost = base_plus_ext(exc.member)[0] or exc.member
            pending_whole = lost != key
        else:
            # A bad header gives no next key: trust the pending sample if it has every member
            # the one before it had.
            pending_whole = expected is not None and expected <= members.keys()
            lost = "" if pending_whole else key
        if members and pending_whole:
            yield from _finish(shard, key, members, problems, errors, stage, decode_image)
        where = f"after member {last!r}" if last else "before the first member"
        dropped = f"; sample {lost!r} lost" if lost else ""
        _record(errors, stage, shard, lost, f"unreadable shard, {where}: {exc!r}{dropped}")
        return
    if members:
        yield from _finish(shard, key, members, problems, errors, stage, decode_image)


def _finish(
    shard: str, key: str, members: dict[str, bytes], problems: list[str], errors: ErrorLog, stage: str,
    decode_image: bool | Collection[str],
) -> Iterator[Sample]:
    """Decode one grouped sample; yield it, or record why it cannot be used."""
    problems = list(problems)
    image = cls = meta = None
    image_ext = next((ext for ext in members if ext in _IMAGE_EXTENSIONS), None)
    if image_ext is None:
        problems.append(f"no image member (members: {', '.join(sorted(members))})")
    elif decode_image is True or (decode_image is not False and key in decode_image):
        try:
            image = decode(members[image_ext])
        except ImageDecodeError as exc:
            problems.append(f"undecodable image {key}.{image_ext}: {exc}")
    if "cls" in members:
        try:
            cls = int(members["cls"].decode("ascii").strip())
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            problems.append(f"bad class label {key}.cls: {exc!r}")
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(f"bad metadata {key}.json: {exc!r}")
    if problems:
        _record(errors, stage, shard, key, "; ".join(problems))
        return
    yield Sample(key=key, shard=shard, image=image, cls=cls, meta=meta)


def _record(errors: ErrorLog, stage: str, shard: str, key: str, reason: str) -> None:
    log.warning("%s: %s [%s]: %s", stage, shard, key, reason)
    errors.append(ErrorRecord(stage=stage, shard=shard, key=key, reason=reason))
