"""Tag morphing on the way out: ``transforms:`` on a route or a destination, applied in order to
a copy of each instance, never to the spool original.

Operations (values may use other tags of the instance, as they were before the transforms:
``"P-{StudyDate}"``)::

    - set: {InstitutionName: Research, ClinicalTrialProtocolID: "P-{StudyDate}"}
    - delete: [OtherPatientIDs, "(0010,1000)"]
    - copy: {StudyID: AccessionNumber}          # target: source
    - regex-replace: {AccessionNumber: {pattern: "^", replace: "EXT-"}}

Streamed: the header (everything before Pixel Data) is read, changed and written by pydicom;
the pixel data element and whatever follows it are copied as bytes, so memory stays flat for
any instance size and the pixels are the same bytes. A Deflated dataset cannot be cut at its
pixel data, so it is read and written whole (in memory). UIDs, the file meta information and
the pixel data are not targets (they would break the ledger, the file or the image).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import dcmread, dcmwrite
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .config.base import ConfigError, _show

KINDS = ("set", "delete", "copy", "regex-replace")
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_FIELD = re.compile(r"\{([A-Za-z][A-Za-z0-9]*)\}")
_PROTECTED_VR = {"UI"}


class TransformError(Exception):
    """A transform cannot be applied to this instance (the reason names it)."""


@dataclass(frozen=True)
class Op:
    kind: str
    tag: int
    value: str = ""  # set: the template; copy: the source keyword
    pattern: re.Pattern[str] | None = None
    replace: str = ""

    def describe(self) -> str:
        name = keyword_for_tag(self.tag) or f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"
        if self.kind == "set":
            return f"set {name} = {self.value!r}"
        if self.kind == "copy":
            return f"copy {self.value} → {name}"
        if self.kind == "regex-replace":
            assert self.pattern is not None
            return f"regex-replace {name} /{self.pattern.pattern}/ → {self.replace!r}"
        return f"delete {name}"


def _tag(name: Any, where: str) -> int:
    m = _TAG.match(str(name))
    tag = (int(m.group(1), 16) << 16 | int(m.group(2), 16)) if m else tag_for_keyword(str(name))
    if tag is None:
        raise ConfigError(where, f"{_show(name)} is not a DICOM keyword or (gggg,eeee) tag")
    if tag >> 16 <= 0x0002 or tag >= 0x7FE00000:
        raise ConfigError(where, f"{_show(name)}: the file meta information and the pixel data "
                          "are not transform targets")
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = ""
    if vr in _PROTECTED_VR:
        raise ConfigError(where, f"{_show(name)} is a UID: morphing does not change UIDs "
                          "(de-identification remaps them consistently)")
    return int(tag)


def _template(value: Any, where: str) -> str:
    text = str(value)
    for kw in _FIELD.findall(text):
        if tag_for_keyword(kw) is None:
            raise ConfigError(where, f"{{{kw}}} is not a DICOM keyword")
    return text


def parse(raw: Any, where: str = "transforms") -> tuple[Op, ...]:
    """The operations of a ``transforms:`` list; ConfigError names the entry that is wrong."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(where, "expected a list of operations (set, delete, copy, "
                          "regex-replace)")
    ops: list[Op] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]" if where else f"[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(at, f"one operation per entry, one of {', '.join(KINDS)}")
        kind, arg = next(iter(item.items()))
        if kind == "deidentify":
            raise ConfigError(f"{at}.deidentify", "de-identification is not implemented yet "
                              "(only set, delete, copy, regex-replace)")
        if kind not in KINDS:
            raise ConfigError(f"{at}.{kind}", f"unknown operation (one of {', '.join(KINDS)})")
        if kind == "delete":
            names = arg if isinstance(arg, list) else [arg]
            ops += [Op("delete", _tag(n, f"{at}.delete")) for n in names]
            continue
        if not isinstance(arg, dict) or not arg:
            raise ConfigError(f"{at}.{kind}", "expected a mapping of tags")
        for target, value in arg.items():
            key = f"{at}.{kind}.{target}"
            tag = _tag(target, key)
            if kind == "set":
                ops.append(Op("set", tag, _template(value, key)))
            elif kind == "copy":
                if tag_for_keyword(str(value)) is None:
                    raise ConfigError(key, f"{_show(value)} is not a DICOM keyword")
                ops.append(Op("copy", tag, str(value)))
            else:
                if not isinstance(value, dict) or set(value) != {"pattern", "replace"}:
                    raise ConfigError(key, "expected {pattern: ..., replace: ...}")
                try:
                    pattern = re.compile(str(value["pattern"]))
                except re.error as exc:
                    raise ConfigError(f"{key}.pattern", f"invalid regular expression: "
                                      f"{exc}") from None
                ops.append(Op("regex-replace", tag, pattern=pattern,
                              replace=str(value["replace"])))
    return tuple(ops)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _put(ds: Dataset, tag: int, value: str) -> None:
    if tag in ds:
        vr = ds[tag].VR
    else:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "LO"
    if vr == "SQ":
        raise TransformError(f"cannot set the sequence {keyword_for_tag(tag) or hex(tag)} to "
                             "a text value")
    ds.add_new(Tag(tag), vr, value.split("\\") if "\\" in value else value)


def apply(ds: Dataset, ops: Sequence[Op]) -> None:
    """Apply ``ops`` in order; templates see the values from before the first operation."""
    before = {kw: _text(ds, kw) for op in ops for kw in _FIELD.findall(op.value)}
    before |= {op.value: _text(ds, op.value) for op in ops if op.kind == "copy"}
    for op in ops:
        if op.kind == "delete":
            if op.tag in ds:
                del ds[op.tag]
        elif op.kind == "set":
            _put(ds, op.tag, _FIELD.sub(lambda m: before.get(m.group(1), ""), op.value))
        elif op.kind == "copy":
            _put(ds, op.tag, before.get(op.value, ""))
        elif op.tag in ds:  # regex-replace on a present element
            assert op.pattern is not None
            _put(ds, op.tag, op.pattern.sub(op.replace, _text_of(ds, op.tag)))
    for elem in list(ds):  # group lengths (retired) would not match the new values
        if elem.tag.element == 0 and elem.tag.group > 0x0002:
            del ds[elem.tag]


def _text_of(ds: Dataset, tag: int) -> str:
    value = ds[tag].value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def transform_file(src: BinaryIO, ops: Sequence[Op], dst: str) -> int:
    """Write ``src`` (a Part 10 file) with ``ops`` applied to ``dst``; returns its size."""
    src.seek(0)
    try:
        ds = dcmread(src, stop_before_pixels=True)
    except Exception as exc:
        raise TransformError(f"cannot read the dataset to transform it: {type(exc).__name__}: "
                             f"{exc}") from None
    deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if deflated:  # no byte offset to cut at: read and write it whole
        src.seek(0)
        ds = dcmread(src)
    pixel_offset = src.tell()
    apply(ds, ops)
    with open(dst, "wb") as out:
        try:
            dcmwrite(out, ds, enforce_file_format=True)
        except Exception as exc:
            raise TransformError(f"cannot write the transformed dataset: "
                                 f"{type(exc).__name__}: {exc}") from None
        if not deflated:
            src.seek(pixel_offset)
            shutil.copyfileobj(src, out, 1 << 20)
        return out.tell()
