"""Decode the protobuf request bodies the fake must accept: v1 Secret, ConfigMap, Namespace and
DeleteOptions, which typed client-go clientsets send as `application/vnd.kubernetes.protobuf`
(helm's release storage; kubectl create configmap|secret|namespace). Every other kind is
refused with 415, as documented in `fakeapi`.

Wire format: b"k8s\\x00" + runtime.Unknown{1: TypeMeta{1: apiVersion, 2: kind}, 2: raw}, raw
being the kind's message. Field numbers are those of k8s.io/api's generated.proto.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

MAGIC = b"k8s\x00"


class UnsupportedProtobuf(ValueError):
    pass


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value): varints as int, length-delimited as bytes."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(data, i)
            yield number, value
        elif wire_type == 2:
            size, i = _varint(data, i)
            yield number, data[i : i + size]
            i += size
        elif wire_type in (1, 5):
            i += 8 if wire_type == 1 else 4  # fixed64/fixed32: no field of ours uses them
        else:
            raise UnsupportedProtobuf(f"wire type {wire_type}")


def _text(value: int | bytes) -> str:
    assert isinstance(value, bytes)
    return value.decode()


def _entry(value: int | bytes) -> tuple[str, bytes]:
    """A map<string, X> entry: key 1, value 2."""
    assert isinstance(value, bytes)
    fields = dict(_fields(value))
    key, item = fields.get(1, b""), fields.get(2, b"")
    assert isinstance(key, bytes) and isinstance(item, bytes)
    return key.decode(), item


def _owner_reference(data: bytes) -> dict:
    names = {1: "kind", 3: "name", 4: "uid", 5: "apiVersion"}
    flags = {6: "controller", 7: "blockOwnerDeletion"}
    ref: dict = {}
    for number, value in _fields(data):
        if number in names:
            ref[names[number]] = _text(value)
        elif number in flags:
            ref[flags[number]] = bool(value)
    return ref


def _object_meta(data: bytes) -> dict:
    strings = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}
    meta: dict = {}
    for number, value in _fields(data):
        if number in strings:
            meta[strings[number]] = _text(value)
        elif number in (11, 12):
            key, item = _entry(value)
            meta.setdefault("labels" if number == 11 else "annotations", {})[key] = item.decode()
        elif number == 13:
            assert isinstance(value, bytes)
            meta.setdefault("ownerReferences", []).append(_owner_reference(value))
        elif number == 14:
            meta.setdefault("finalizers", []).append(_text(value))
    return meta


def _b64(item: bytes) -> str:
    return base64.b64encode(item).decode()


def _secret(raw: bytes) -> dict:
    obj: dict = {"apiVersion": "v1", "kind": "Secret"}
    for number, value in _fields(raw):
        if number == 1:
            assert isinstance(value, bytes)
            obj["metadata"] = _object_meta(value)
        elif number in (2, 4):  # data (bytes, base64 in JSON), stringData
            key, item = _entry(value)
            field, text = ("data", _b64(item)) if number == 2 else ("stringData", item.decode())
            obj.setdefault(field, {})[key] = text
        elif number == 3:
            obj["type"] = _text(value)
        elif number == 5:
            obj["immutable"] = bool(value)
    return obj


def _config_map(raw: bytes) -> dict:
    obj: dict = {"apiVersion": "v1", "kind": "ConfigMap"}
    for number, value in _fields(raw):
        if number == 1:
            assert isinstance(value, bytes)
            obj["metadata"] = _object_meta(value)
        elif number in (2, 3):  # data (string), binaryData (bytes, base64 in JSON)
            key, item = _entry(value)
            field, text = ("data", item.decode()) if number == 2 else ("binaryData", _b64(item))
            obj.setdefault(field, {})[key] = text
        elif number == 4:
            obj["immutable"] = bool(value)
    return obj


def _namespace(raw: bytes) -> dict:
    obj: dict = {"apiVersion": "v1", "kind": "Namespace"}
    for number, value in _fields(raw):
        if number == 1:
            assert isinstance(value, bytes)
            obj["metadata"] = _object_meta(value)
    return obj


def _delete_options(raw: bytes) -> dict:
    options: dict = {"kind": "DeleteOptions"}
    for number, value in _fields(raw):
        if number == 1:
            assert isinstance(value, int)
            options["gracePeriodSeconds"] = value
        elif number == 2:
            assert isinstance(value, bytes)
            names = {1: "uid", 2: "resourceVersion"}
            options["preconditions"] = {names[n]: _text(v) for n, v in _fields(value) if n in names}
        elif number == 3:
            options["orphanDependents"] = bool(value)
        elif number == 4:
            options["propagationPolicy"] = _text(value)
        elif number == 5:
            options.setdefault("dryRun", []).append(_text(value))
    return options


DECODERS = {
    "Secret": _secret,
    "ConfigMap": _config_map,
    "Namespace": _namespace,  # metadata only: kubectl create namespace
    "DeleteOptions": _delete_options,
}


def decode(body: bytes) -> dict:
    if not body.startswith(MAGIC):
        raise UnsupportedProtobuf("no k8s protobuf magic")
    unknown = dict(_fields(body[len(MAGIC) :]))
    type_meta, raw = unknown.get(1, b""), unknown.get(2, b"")
    assert isinstance(type_meta, bytes) and isinstance(raw, bytes)
    names = {number: _text(value) for number, value in _fields(type_meta)}
    api_version, kind = names.get(1, ""), names.get(2, "")
    decoder = DECODERS.get(kind)
    if decoder is None or api_version not in ("v1", "meta.k8s.io/v1"):
        raise UnsupportedProtobuf(f"protobuf {api_version} {kind}")
    return decoder(raw)
