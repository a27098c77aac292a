"""TopologyView's lazy load (`apply_all(raw=...)`): stored chains and rules kept undecoded
until a chain is looked up. A lazily loaded view compiles every chain as an eager one does,
later changes (decoded, as watch events come) are seen and tagged as before, and a bad
stored value is reported by the decoder and left out, as at an eager load."""

from __future__ import annotations

import ipaddress

import pytest

from hivenet.model import (
    Chain,
    IpAddrGroup,
    Rule,
    RuleAction,
    TopologyObject,
    decode,
    encode,
    peek_id,
)
from hivenet.sim import TopologyView
from hivenet.sim.topology import LAZY_KINDS
from tests.unit.sim.topo import Topo


def sample() -> Topo:
    topo = Topo()
    topo.chain("c1")
    topo.chain("c2")
    topo.rule("c1", "drop", position=1, nw_proto=6)
    topo.rule("c1", "accept", position=2, ip_addr_group_src_id="g")
    topo.rule("c2", "accept", position=1, nw_src=ipaddress.ip_network("10.1.0.0/16"))
    topo.add(IpAddrGroup(id="g", addresses=(ipaddress.ip_address("10.0.0.1"),)))
    topo.bridge("b1", inbound_chain_id="c1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24",))
    return topo


class Decoder:
    """The agent's part: decode, and report (here: record) a bad value by key."""

    def __init__(self) -> None:
        self.bad: dict[tuple[str, str], str] = {}
        self.decoded: list[tuple[str, str]] = []

    def __call__(self, kind: str, object_id: str, value: bytes) -> TopologyObject | None:
        self.decoded.append((kind, object_id))
        try:
            obj = decode(kind, value)
        except ValueError as exc:
            self.bad[(kind, object_id)] = str(exc)
            return None
        return obj if obj.id == object_id else None


def lazy_view(objects: list[TopologyObject]) -> tuple[TopologyView, Decoder]:
    decoder = Decoder()
    view = TopologyView(decode=decoder)
    eager = [o for o in objects if o.KIND not in LAZY_KINDS]
    view.apply_all(eager, [(o.KIND, o.id, encode(o)) for o in objects if o.KIND in LAZY_KINDS])
    return view, decoder


def compiled(view: TopologyView, chain_id: str) -> tuple[str, tuple[str, ...]]:
    chain = view.chains[chain_id]
    return chain.source, tuple(r.rule.id for r in chain.rules)


def test_peek_reads_the_chain_id_only_when_certain() -> None:
    rule = Rule(id="r1", chain_id="c-1.x", action=RuleAction.ACCEPT)
    assert peek_id(encode(rule), "chain_id") == "c-1.x"
    # Not as `encode` writes it, or the name also appears as a string: decode instead.
    assert peek_id(b'{"chain_id": "c1", "id": "r1"}', "chain_id") is None
    assert peek_id(b'{"name":"chain_id","chain_id":"c1"}', "chain_id") is None
    assert peek_id(b'{"chain_id":"c1","chain_id":"c2"}', "chain_id") is None
    assert peek_id(b'{"chain_id":"not an id"}', "chain_id") is None
    assert peek_id(b'{"chain_id":"c1', "chain_id") is None
    assert peek_id(b'{"id":"r1"}', "chain_id") is None
    assert peek_id(b'{"chain_id":"' + b"c" * 64 + b'"}', "chain_id") == "c" * 64
    assert peek_id(b'{"chain_id":"' + b"c" * 65 + b'"}', "chain_id") is None
    assert peek_id(b'{"chain_id":"c1\n"}', "chain_id") is None
    assert peek_id(b'{"chain_id":"-c1"}', "chain_id") is None


def test_lazy_load_decodes_nothing_until_a_chain_is_looked_up_then_compiles_the_same() -> None:
    objects = sample().objects
    eager = TopologyView.from_objects(objects)
    view, decoder = lazy_view(objects)
    assert decoder.decoded == []
    assert dict.__len__(view.chains) == 0
    assert view.loaded("rule") == []
    revision = view.revision
    assert compiled(view, "c1") == compiled(eager, "c1")
    # Decoding changed what `loaded` returns: the revision says so (caches keyed on it).
    assert view.revision > revision and len(view.loaded("rule")) == 2
    assert sorted(decoder.decoded) == sorted(
        [("chain", "c1")] + [("rule", o.id) for o in objects if getattr(o, "chain_id", "") == "c1"]
    )
    assert "c2" in view.chains and view.chains.get("c2") is not None
    assert compiled(view, "c2") == compiled(eager, "c2")
    assert view.chains.get("nope") is None and "nope" not in view.chains
    with pytest.raises(KeyError):
        view.chains["nope"]
    assert {o.id for o in view.all("rule")} == {o.id for o in eager.all("rule")}


def test_changes_after_a_lazy_load_are_seen_and_tagged() -> None:
    topo = sample()
    view, _ = lazy_view(topo.objects)
    view.chains["c1"]  # in use
    rule_c2 = next(o for o in topo.objects if isinstance(o, Rule) and o.chain_id == "c2")
    # A rule of a chain never looked up moves to a chain in use: both tagged, c1 recompiled.
    moved = rule_c2.model_copy(update={"chain_id": "c1", "position": 0})
    assert {"chain:c1", "chain:c2", f"rule:{moved.id}"} <= view.apply(moved)
    assert moved.id in compiled(view, "c1")[1]
    assert compiled(view, "c2")[1] == ()
    # A rule of a chain not compiled yet is seen on its first lookup.
    fresh, _ = lazy_view(topo.objects)
    changed = rule_c2.model_copy(update={"action": RuleAction.DROP})
    assert "chain:c2" in fresh.apply(changed)
    assert fresh.chains["c2"].rules[0].rule == changed
    # A deleted undecoded rule and chain.
    assert "chain:c2" in fresh.remove("rule", changed.id)
    assert compiled(fresh, "c2")[1] == ()
    assert "chain:c1" in fresh.remove("chain", "c1")
    assert fresh.chains.get("c1") is None
    # An ip address group change recompiles the chains in use that read it.
    view.chains["c1"]
    group = IpAddrGroup(id="g", addresses=(ipaddress.ip_address("10.0.0.2"),))
    assert "chain:c1" in view.apply(group)


def test_a_reload_of_undecoded_values_over_compiled_chains_recompiles_them() -> None:
    topo = sample()
    view, _ = lazy_view(topo.objects)
    before = compiled(view, "c1")
    rule = next(o for o in topo.objects if isinstance(o, Rule) and o.chain_id == "c1")
    replaced = rule.model_copy(update={"action": RuleAction.ACCEPT, "position": 9})
    tags = view.apply_all([], [("rule", replaced.id, encode(replaced))])
    assert "chain:c1" in tags
    assert dict.__contains__(view.chains, "c1")  # compiled at once: it was in use
    assert compiled(view, "c1") != before
    assert view.chains["c1"].rules[-1].rule == replaced


def test_a_reload_of_undecoded_values_moves_rules_between_undecoded_chains() -> None:
    """A second raw load over values still undecoded (a resync): a rule that moved to another
    chain leaves the first, a chain's new value replaces the old, the revision moves."""
    topo = sample()
    view, _ = lazy_view(topo.objects)
    revision = view.revision
    rule = next(o for o in topo.objects if isinstance(o, Rule) and o.chain_id == "c1")
    moved = rule.model_copy(update={"chain_id": "c2", "position": 7})
    renamed = Chain(id="c2", name="renamed")
    tags = view.apply_all([], [("rule", moved.id, encode(moved)), ("chain", "c2", encode(renamed))])
    assert {"chain:c1", "chain:c2"} <= tags
    assert view.revision > revision
    assert moved.id not in compiled(view, "c1")[1]
    assert moved.id in compiled(view, "c2")[1]
    assert view.chains["c2"].name == "renamed"
    eager = TopologyView.from_objects(
        [moved if o.id == moved.id else renamed if o.id == "c2" else o for o in topo.objects]
    )
    for chain_id in ("c1", "c2"):
        assert compiled(view, chain_id) == compiled(eager, chain_id)


def test_a_load_that_fails_midway_leaves_the_chains_filed_before_it_lookupable() -> None:
    """Chains are marked lazy once at the end of a raw load, also when a value on the way
    raised: those filed before it compile on their first lookup."""
    topo = sample()

    def failing(kind: str, object_id: str, value: bytes) -> TopologyObject | None:
        if object_id == "boom":
            raise RuntimeError("decoder bug")
        return decode(kind, value)

    view = TopologyView(decode=failing)
    view.apply_all([o for o in topo.objects if o.KIND not in LAZY_KINDS])
    raw = [(o.KIND, o.id, encode(o)) for o in topo.objects if o.KIND in LAZY_KINDS]
    with pytest.raises(RuntimeError):
        view.apply_all([], [*raw, ("rule", "boom", b'{"id":"boom"}')])
    eager = TopologyView.from_objects(topo.objects)
    for chain_id in ("c1", "c2"):
        assert compiled(view, chain_id) == compiled(eager, chain_id)


def test_a_bad_stored_rule_is_reported_by_key_and_field_and_left_out() -> None:
    topo = sample()
    view, decoder = lazy_view(topo.objects)
    bad = b'{"id":"rbad","chain_id":"c1","action":"accept","position":-3}'
    view.apply_all([], [("rule", "rbad", bad), ("chain", "cbad", b'{"id":"cbad","name":7}')])
    assert "rbad" not in compiled(view, "c1")[1]
    assert "position" in decoder.bad[("rule", "rbad")]
    assert view.get("rule", "rbad") is None
    assert view.chains.get("cbad") is None
    assert "name" in decoder.bad[("chain", "cbad")]
    # The bad rule is out of every index: a later good value for it is applied normally.
    good = Rule(id="rbad", chain_id="c2", action=RuleAction.DROP, position=5)
    view.apply(good)
    assert "rbad" in compiled(view, "c2")[1] and "rbad" not in compiled(view, "c1")[1]


def test_undecoded_values_need_a_decoder() -> None:
    chain = Chain(id="c", name="c")
    with pytest.raises(TypeError):
        TopologyView().apply_all([], [("chain", "c", encode(chain))])
