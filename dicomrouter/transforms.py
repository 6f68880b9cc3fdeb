"""Tag morphing on the way out: ``transforms:`` on a route or a destination, applied in order to
a copy of each instance, never to the spool original.

Operations, in order (values may use other tags of the instance as they are when the operation
runs: ``"P-{StudyDate}"``; after a ``deidentify``, those are the de-identified values)::

    - deidentify: {retain: [dates], uid_secret_env: DEID_SECRET, patient_id: "ANON-{hash:8}"}
    - set: {InstitutionName: Research, ClinicalTrialProtocolID: "P-{StudyDate}"}
    - delete: [OtherPatientIDs, "(0010,1000)"]
    - copy: {StudyID: AccessionNumber}          # target: source
    - regex-replace: {AccessionNumber: {pattern: "^", replace: "EXT-"}}
    - deidentify: {reversible: true, key_env: PSEUDONYM_KEY}   # mapping kept (pseudonym.py)
    - reidentify: true                          # or {key_env: NAME}: results coming back

Streamed: the header (everything before Pixel Data) is read, changed and written by pydicom;
the pixel data element and whatever follows it are copied as bytes, so memory stays flat for
any instance size and the pixels are the same bytes. A Deflated dataset cannot be cut at its
pixel data, so it is read and written whole (in memory). UIDs, the file meta information and
the pixel data are not targets (they would break the ledger, the file or the image).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import dcmread, dcmwrite
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .deid import from_options
from .deid_table import DeidentifyModel, keywords
from .dicomfile import INDEX_KEYWORDS, text
from .pseudonym import PseudonymKeyError, load_key, pseudonymize, reidentify
from .values import ConfigError, show

KINDS = ("deidentify", "set", "delete", "copy", "regex-replace", "reidentify")
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
    deid: Any = None  # deid.Deidentifier
    key: Any = None  # reversible deidentify, reidentify: the mapping's key (a Fernet)
    state: Any = None  # ... and the state that keeps the mapping (bound at delivery: bind)
    scope: str = ""  # ... the route whose mapping it is

    def describe(self) -> str:
        if self.kind == "deidentify":
            d = self.deid
            extra = [f"retain {', '.join(sorted(d.retain))}"] if d.retain else []
            extra += ["dates shifted"] if d.shift_dates else []
            extra += ["private tags kept"] if d.keep_private else []
            if d.keep:
                extra += [f"keep {', '.join(keywords(d.keep))}"]
            extra += ["reversible"] if self.key is not None else []
            return "deidentify (PS3.15 basic profile" + \
                "".join(f"; {e}" for e in extra) + ")"
        if self.kind == "reidentify":
            return "reidentify (the pseudonymization mapping)"
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
        raise ConfigError(where, f"{show(name)} is not a DICOM keyword or (gggg,eeee) tag")
    if tag >> 16 <= 0x0002 or tag >= 0x7FE00000:
        raise ConfigError(where, f"{show(name)}: the file meta information and the pixel data "
                          "are not transform targets")
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = ""
    if vr in _PROTECTED_VR:
        raise ConfigError(where, f"{show(name)} is a UID: morphing does not change UIDs "
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
            if arg is not None and not isinstance(arg, dict):
                raise ConfigError(f"{at}.deidentify", "expected a mapping of options (or none)")
            deid = from_options(arg or {}, f"{at}.deidentify")
            m = DeidentifyModel.model_validate(arg or {})  # valid: from_options said so
            key = load_key(m.key_env, f"{at}.deidentify.key_env") if m.reversible else None
            ops.append(Op("deidentify", 0, deid=deid, key=key))
            continue
        if kind == "reidentify":
            ops.append(Op("reidentify", 0, key=_reidentify_key(arg, f"{at}.reidentify")))
            continue
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
                    raise ConfigError(key, f"{show(value)} is not a DICOM keyword")
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


def _reidentify_key(arg: Any, where: str) -> Any:
    """``reidentify: true`` (the key in PSEUDONYM_KEY) or ``reidentify: {key_env: NAME}``."""
    if arg is True:
        return load_key(None, f"{where}.key_env")
    if isinstance(arg, dict) and set(arg) <= {"key_env"}:
        return load_key(str(arg["key_env"]) if arg.get("key_env") else None,
                        f"{where}.key_env")
    raise ConfigError(where, "expected true or {key_env: NAME}")


def bind(ops: Sequence[Any], state: Any, scope: str) -> list[Any]:
    """``ops`` with the state (and the route, ``scope``) that reversible de-identification and
    re-identification keep and read their mapping in; other operations as they are."""
    return [dataclasses.replace(op, state=state, scope=scope)
            if isinstance(op, Op) and op.key is not None else op for op in ops]


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
    """Apply ``ops`` in order; each sees the dataset as the operations before it left it."""
    for op in ops:
        if op.kind == "coerce":  # coerce.CoerceRun: looked-up values, first of all
            op.apply(ds)
            continue
        if op.kind == "deidentify":
            try:
                if op.key is not None:
                    pseudonymize(ds, op.deid, op.key, op.state, op.scope)
                else:
                    op.deid.apply(ds)
            except ValueError as exc:
                raise TransformError(str(exc)) from None
            continue
        if op.kind == "reidentify":
            if op.state is None:
                raise TransformError("reidentify needs the router's state")
            try:
                if not reidentify(ds, op.state, op.key):
                    raise TransformError(f"reidentify: no pseudonymization mapping for study "
                                         f"{show(_text(ds, 'StudyInstanceUID'))}")
            except PseudonymKeyError as exc:
                raise TransformError(f"reidentify: {exc}") from None
            continue
        before = {kw: _text(ds, kw) for kw in _FIELD.findall(op.value)}
        if op.kind == "copy":
            before[op.value] = _text(ds, op.value)
        if op.kind == "delete":
            if op.tag in ds:
                del ds[op.tag]
        elif op.kind == "set":
            _put(ds, op.tag, _FIELD.sub(lambda m, b=before: b.get(m.group(1), ""), op.value))
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


def _is_pixel_data(tag: bytes, little: bool) -> bool:
    """(7FE0,0010), (7FE0,0008) or (7FE0,0009): a pixel data element (and not the end of the
    file, or trailing padding without pixel data)."""
    if len(tag) < 4:
        return False
    group, elem = struct.unpack(("<" if little else ">") + "HH", tag)
    return group == 0x7FE0 and elem in (0x0010, 0x0008, 0x0009)


def _copy(src: BinaryIO, out: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise TransformError("the file ends inside its pixel data")
        out.write(chunk)
        n -= len(chunk)


def element_end(f: BinaryIO, offset: int, implicit: bool, little: bool) -> int:
    """Where the data element at ``offset`` ends (an undefined length one after its sequence
    delimiter: encapsulated pixel data is walked item by item, nothing is read into memory)."""
    order = "<" if little else ">"
    f.seek(offset)
    head = f.read(12)
    if len(head) < 8:
        raise TransformError("the file ends inside its pixel data header")
    if implicit:
        length, start = struct.unpack(order + "I", head[4:8])[0], offset + 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UN", b"UT", b"UC",
                       b"UR", b"SV", b"UV"):
        length, start = struct.unpack(order + "I", head[8:12])[0], offset + 12
    else:
        length, start = struct.unpack(order + "H", head[6:8])[0], offset + 8
    if length != 0xFFFFFFFF:
        return start + length
    pos = start
    while True:  # items until the sequence delimitation item (FFFE,E0DD)
        f.seek(pos)
        item = f.read(8)
        if len(item) < 8:
            raise TransformError("the file ends inside its encapsulated pixel data")
        group, elem, item_length = struct.unpack(order + "HHI", item)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000) or item_length == 0xFFFFFFFF:
            raise TransformError("encapsulated pixel data without its item structure")
        pos += item_length


def transform_file(src: BinaryIO, ops: Sequence[Op], dst: str) -> tuple[int, dict[str, str]]:
    """Write ``src`` (a Part 10 file) with ``ops`` applied to ``dst``; returns its size and its
    index tags as they are now (new UIDs and pseudonyms after de-identification: folder and
    object names are made from them)."""
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
    ts = ds.file_meta.get("TransferSyntaxUID")
    implicit = ts is not None and ts.is_implicit_VR
    little = ts is None or ts.is_little_endian
    # De-identification drops what follows the pixel data (trailing padding, digital
    # signatures: both removed by the profile); morphing copies it as it is
    tail = not any(op.kind == "deidentify" for op in ops)
    apply(ds, ops)
    with open(dst, "wb") as out:
        try:
            dcmwrite(out, ds, enforce_file_format=True)
        except Exception as exc:
            raise TransformError(f"cannot write the transformed dataset: "
                                 f"{type(exc).__name__}: {exc}") from None
        if not deflated:
            src.seek(pixel_offset)
            if tail:
                shutil.copyfileobj(src, out, 1 << 20)
            elif _is_pixel_data(src.read(4), little):
                end = element_end(src, pixel_offset, implicit, little)
                src.seek(pixel_offset)
                _copy(src, out, end - pixel_offset)
        size = out.tell()
    return size, {kw: text(ds.get(kw)) for kw in INDEX_KEYWORDS}
