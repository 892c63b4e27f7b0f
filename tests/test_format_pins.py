"""Archive bytes are pinned: the same inputs give the same arrays and metadata as recorded.

``tests/data/format_v2_digests.json`` was recorded by ``tests/format_pins.py``; any change to
what a pack writes shows up here as a file whose digest moved (metadata compared canonically,
pack time and generation aside). A deliberate format change re-records it in the same commit,
with the spec. (The v1 digests, recorded before the reading and packing layers were
redesigned, proved that redesign wrote identical bytes; v1 archives themselves are pinned by
tests/test_v1_archives.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import format_pins

RECORDED = Path(__file__).parent / "data" / "format_v2_digests.json"


def test_packing_the_pinned_collections_writes_the_recorded_bytes(tmp_path: Path) -> None:
    recorded = json.loads(RECORDED.read_text())
    got = format_pins.pack_all(tmp_path)
    assert sorted(got) == sorted(recorded)
    for name in recorded:
        moved = sorted(k for k in set(recorded[name]) | set(got[name]) if recorded[name].get(k) != got[name].get(k))
        assert not moved, f"{name}: {len(moved)} files differ, e.g. {moved[:5]}"
