"""The kernel fast path's shared header (io/kernel/channel_relay.h) and user space agree:
the pass-up reasons in order, and each map's key size, value size and the offsets of
the owner and the counters, as the header's _Static_asserts state them (clang checks
those against the structs whenever the object is built)."""

from __future__ import annotations

import re
from pathlib import Path

from turnserver.io.kernel import program

HEADER = Path(program.SOURCE).with_name("channel_relay.h")
STRUCTS = {  # map -> (key struct, value struct)
    b"client_to_peer": ("client_key", "client_value"),
    b"peer_to_client": ("peer_key", "peer_value"),
    b"client_to_peer6": ("client_key6", "client_value6"),
    b"peer_to_client6": ("peer_key6", "peer_value6"),
}


def _asserted() -> dict[str, int]:
    """`sizeof(struct X)` and `X.field` -> the value the header asserts."""
    text = HEADER.read_text()
    out = {
        m[1]: int(m[2])
        for m in re.finditer(r"_Static_assert\(sizeof\(struct (\w+)\) == (\d+)", text)
    }
    for m in re.finditer(
        r"_Static_assert\(__builtin_offsetof\(struct (\w+), (\w+)\) == (\d+)", text
    ):
        out[f"{m[1]}.{m[2]}"] = int(m[3])
    return out


def test_pass_reasons_are_the_headers_enum_in_order() -> None:
    body = re.search(r"enum pass_reason \{(.*?)\};", HEADER.read_text(), re.S)
    assert body is not None
    names = re.findall(r"^\s*PASS_(\w+)", body[1], re.M)
    assert names[-1] == "REASONS"  # the count, not a reason
    assert tuple(n.lower() for n in names[:-1]) == program.PASS_REASONS


def test_map_layouts_are_the_headers_structs() -> None:
    asserted = _asserted()
    for name, (key, value) in STRUCTS.items():
        key_size, value_size, owner_at, counters_at = program._LAYOUT[name]
        assert asserted[key] == key_size, name
        assert asserted[value] == value_size, name
        assert asserted[f"{value}.owner"] == owner_at, name
        assert asserted[f"{value}.packets"] == counters_at, name


def test_every_struct_and_counter_is_asserted() -> None:
    """A struct added to the header without its sizes cannot slip past the check."""
    text = HEADER.read_text()
    structs = set(re.findall(r"^struct (\w+) \{", text, re.M))
    asserted = _asserted()
    assert structs == {s for pair in STRUCTS.values() for s in pair}
    assert structs <= set(asserted)
    source = program.SOURCE.read_text()
    used = set(re.findall(r"pass\((PASS_\w+)\)", source))
    declared = {f"PASS_{n.upper()}" for n in program.PASS_REASONS}
    assert used == declared, "every reason is counted somewhere, and only those"
