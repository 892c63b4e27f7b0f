"""Tensor name → storage node name (spec §5): safe, injective, deterministic."""

from __future__ import annotations

import hashlib
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tallstore.storage.names import MAX_LEN, encode

SAFE_NODE = re.compile(r"^[a-z0-9_.~-]+$")

# Names that look like real tensor names, plus arbitrary text (all of Unicode, lone surrogates
# included: a safetensors header may spell one with a JSON escape).
_name_chars = st.sampled_from(list("abcXYZ019_.-/~ %") + ["ü", "λ", "\U0001f600", "\ud800"])
names = st.one_of(
    st.text(_name_chars, max_size=140),
    st.text(max_size=60),
    st.from_regex(r"[a-z._]{0,130}", fullmatch=True),
)


@settings(max_examples=400, deadline=None)
@given(names)
@example("")
@example(".")
@example("..")
@example("__init__")
@example("zarr.json")
@example("x" * 500)
def test_node_names_are_safe_path_components(name: str) -> None:
    node = encode(name)
    assert SAFE_NODE.match(node), node
    assert "/" not in node
    assert node not in (".", "..", "zarr.json")
    assert not node.startswith(".")
    assert not node.startswith("__")
    assert len(node) <= MAX_LEN == 120


@settings(max_examples=400, deadline=None)
@given(names, names)
@example("A", "~41")
@example("a/b", "a~2fb")
@example("_", "~5f")
@example("__a", "~5f_a")
@example("zarr.json", "~7aarr.json")
@example("a" * 54 + "b" * 70, "a" * 54 + "c" * 70)
def test_distinct_names_get_distinct_nodes(a: str, b: str) -> None:
    if a != b:
        assert encode(a) != encode(b)


def decode(node: str) -> str:
    """Inverse of the escaping (not of the hashing): ``~xx`` back to bytes, the rest verbatim."""
    if node == "~":
        return ""
    out, i = bytearray(), 0
    while i < len(node):
        if node[i] == "~":
            out.append(int(node[i + 1 : i + 3], 16))
            i += 3
        else:
            out += node[i].encode()
            i += 1
    return out.decode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(names)
@example("zarr.json")
@example("")
def test_node_determines_the_name(name: str) -> None:
    """Short nodes decode back to the name; long ones end in the name's SHA-256: so no collisions."""
    node = encode(name)
    if "~h" in node:
        assert node.endswith(hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest())
    else:
        assert decode(node) == name


def test_safe_ascii_names_are_kept_verbatim() -> None:
    assert encode("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert encode("lm-head_1") == "lm-head_1"


def test_other_characters_become_tilde_hex_of_their_utf8_bytes() -> None:
    assert encode("Wq") == "~57q"
    assert encode("a/b") == "a~2fb"
    assert encode("a~b") == "a~7eb"
    assert encode("ü") == "~c3~bc"


def test_leading_dot_and_leading_double_underscore_are_escaped() -> None:
    assert encode(".") == "~2e"
    assert encode("..") == "~2e."
    assert encode(".hidden") == "~2ehidden"
    assert encode("__init__") == "~5f_init__"
    assert encode("_x") == "_x"


def test_empty_name_is_a_lone_tilde() -> None:
    assert encode("") == "~"


def test_zarr_metadata_name_is_escaped() -> None:
    """A tensor called ``zarr.json`` must not collide with its group's metadata document."""
    assert encode("zarr.json") == "~7aarr.json"
    assert encode("zarr.jsonx") == "zarr.jsonx"


def test_long_names_become_prefix_plus_sha256() -> None:
    name = "Layer." * 40
    escaped = "".join("~4c" if c == "L" else c for c in name)
    digest = hashlib.sha256(name.encode()).hexdigest()
    assert encode(name) == escaped[:54] + "~h" + digest
    assert len(encode(name)) == MAX_LEN


def test_a_name_escaping_to_exactly_max_len_is_not_hashed() -> None:
    assert encode("a" * MAX_LEN) == "a" * MAX_LEN
    assert "~h" in encode("a" * (MAX_LEN + 1))
