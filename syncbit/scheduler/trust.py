"""The trust facts around chunk digests: disputes, re-checks, quarantined nodes, broken
versions, and the notices that tell holders to drop bytes proven false.

The rules (README "Security and reliability"):
- A report that disagrees with the recorded digest is never settled by counting votes: it
  opens a *dispute*, and one node that is neither the establisher nor the reporter, chosen
  at random by the scheduler, reads the chunk from the source again (`rechecks_for`,
  `check`). Its answer decides: it matches the record -> the reporter lied; it matches the
  reporter -> the establisher lied (its digest is revoked, holders told to discard); the
  source changed (matches neither, or its version check failed) -> the file's version is
  *broken*: every node refuses it until `dataset add` resolves the source again.
- A liar is *quarantined*: never offered as a peer, never a plan member, its reports and
  checks dropped, every digest it established forgotten, until an operator lifts it.
Disputes, quarantine marks, broken marks and revocations are durable (`facts`); notices
are soft: a holder of revoked bytes that re-reports them after a restart is told again.
Never decides who may establish a digest (`claims`), never reads a source itself.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from syncbit.chunks import chunk_count
from syncbit.errors import NotFoundError, UserError
from syncbit.scheduler.facts import Facts, Txn
from syncbit.scheduler.records import check_digest, check_name

log = logging.getLogger("syncbit.scheduler")

MAX_DISPUTES = 256  # open disputes; more conflicts wait (logged) until some are settled
RECHECK_TIMEOUT = 60.0  # seconds a node asked to re-check a chunk has before another is
MAX_NOTICES = 256  # objects to discard handed to a node per heartbeat
CHANGED = "changed"  # a dispute claim: the source no longer has the recorded version


def dispute_key(object_id: str, index: int) -> str:
    return f"dispute/{object_id}/{index}"


def _ask(dispute: dict[str, Any]) -> dict[str, Any]:
    """What a node asked to re-check a disputed chunk is told."""
    return {k: dispute[k] for k in ("object", "chunk", "dataset", "path")}


class Trust:
    """Disputes and their outcomes over `facts`.

    Args:
        facts: the durable facts (disputes, quarantine, broken marks, digests).
        clock: wall-clock seconds.
        eligible: whether a node is up and not quarantined (may check, may be offered).
        up: the names of the nodes up now.
        drop_holders: forgets every holder of these chunks of an object; returns those
            that held any of them.
        trust_changed: a node was quarantined (False) or trusted again (True).
    """

    def __init__(
        self,
        facts: Facts,
        clock: Callable[[], float],
        eligible: Callable[[str], bool],
        up: Callable[[], set[str]],
        drop_holders: Callable[[str, set[int]], list[str]],
        trust_changed: Callable[[str, bool], None],
    ) -> None:
        self.facts = facts
        self.clock = clock
        self.eligible = eligible
        self.up = up
        self.drop_holders = drop_holders
        self.trust_changed = trust_changed
        self.notices: dict[str, set[str]] = {}  # node -> objects it must discard

    # -- checks and disputes ---------------------------------------------------------------------

    async def check(
        self, node: str, object_id: str, index: int, digest: str | None, changed: str = ""
    ) -> str:
        """What `node` read from the source for chunk `index`: its digest, or `changed`
        (why the source no longer has the recorded version). Returns "dropped" (the node
        is quarantined), "ok" (agrees with the record, or nothing to compare), "disputed"
        (a re-check is under way, or this opened one), or from the node asked to re-check:
        "reporter-lied", "establisher-lied", "source-changed" (settled)."""
        check_name("node", node)
        raw = bytes.fromhex(check_digest(index, digest)) if digest else None
        if raw is None and not changed:
            raise UserError("a check needs a digest or what changed")
        if not 0 <= index < 2**32:
            raise UserError(f"invalid chunk index {index}")
        facts = self.facts
        async with facts.transaction() as txn:
            if node in facts.quarantine:
                return "dropped"
            if object_id in facts.broken:
                return "source-changed"
            dispute = facts.disputes.get((object_id, index))
            if dispute is not None:
                if dispute["checker"] != node:
                    log.info(
                        "node %s checked chunk %d of object %s under dispute; it was not "
                        "asked to: not counted",
                        node,
                        index,
                        object_id[:16],
                    )
                    return "disputed"
                return self._settle(txn, dispute, raw, changed)
            obj = facts.objects.get(object_id)
            recorded = obj.digests.get(index) if obj is not None else None
            if not changed and (recorded is None or recorded == raw):
                return "ok"
        claim = CHANGED if changed else (raw or b"").hex()
        return await self.open_dispute(
            node, object_id, index, claim, changed or "read from the source"
        )

    async def open_dispute(
        self, reporter: str, object_id: str, index: int, claim: str, reason: str
    ) -> str:
        """`reporter` says chunk `index` of an object is `claim` (a digest, or "changed"),
        against the record: ask a third node to read it from the source. Returns
        "disputed", or "ok" when there is nothing to dispute (no dataset has the object
        any more, or too many disputes are open: logged)."""
        facts = self.facts
        if any(o == object_id for o, _ in facts.disputes):
            return "disputed"  # one at a time per object: its outcome settles the rest
        if len(facts.disputes) >= MAX_DISPUTES:
            log.error(
                "node %s disputes chunk %d of object %s, but %d disputes are open already: "
                "not recorded",
                reporter,
                index,
                object_id[:16],
                MAX_DISPUTES,
            )
            return "ok"
        where = facts.locate(object_id)
        if where is None or not 0 <= index < chunk_count(where[2], where[3]):
            log.warning(
                "node %s disputes chunk %d of object %s, which no dataset has: ignored",
                reporter,
                index,
                object_id[:16],
            )
            return "ok"
        async with facts.transaction() as txn:
            if any(o == object_id for o, _ in facts.disputes):
                return "disputed"
            if len(facts.disputes) >= MAX_DISPUTES:
                return "ok"  # filled up meanwhile (logged above when it is so already)
            dispute = self._dispute(reporter, object_id, index, claim, reason, where)
            txn.put(dispute_key(object_id, index), json.dumps(dispute).encode())
        log.warning(
            "dispute over chunk %d of %s/%s (object %s): node %s says %s (%s), recorded %s "
            "by %s; a third node will read it from the source",
            index,
            where[0],
            where[1],
            object_id[:16],
            reporter,
            claim if claim == CHANGED else claim[:16],
            reason,
            (dispute["recorded"] or "nothing")[:16],
            dispute["establisher"] or "(unknown)",
        )
        return "disputed"

    def _dispute(
        self,
        reporter: str,
        object_id: str,
        index: int,
        claim: str,
        reason: str,
        where: tuple[str, str, int, int, bool],
    ) -> dict[str, Any]:
        """A new dispute's record: what is claimed against what is recorded, by whom."""
        obj = self.facts.objects.get(object_id)
        recorded = obj.digests.get(index) if obj is not None else None
        return {
            "object": object_id,
            "chunk": index,
            "recorded": recorded.hex() if recorded else None,
            "establisher": obj.establisher.get(index, "") if obj and recorded else "",
            "reporter": reporter,
            "claim": claim,
            "reason": reason,
            "dataset": where[0],
            "path": where[1],
            "unproven": where[4],
            "opened": self.clock(),
            "checker": None,
            "asked": 0.0,
        }

    def _settle(self, txn: Txn, dispute: dict[str, Any], raw: bytes | None, changed: str) -> str:
        """The asked node's answer decides a dispute (inside the transaction)."""
        object_id, index = str(dispute["object"]), int(dispute["chunk"])
        txn.delete(dispute_key(object_id, index))
        recorded = bytes.fromhex(dispute["recorded"]) if dispute["recorded"] else None
        claim: str = dispute["claim"]
        where = f"chunk {index} of {dispute['dataset']}/{dispute['path']}"
        checker, reporter = dispute["checker"], dispute["reporter"]
        establisher = dispute["establisher"]
        if raw is not None and (raw == recorded or (recorded is None and claim == CHANGED)):
            self._quarantine_in(txn, reporter, f"false report on {where}, re-checked by {checker}")
            return "reporter-lied"
        if raw is not None and claim != CHANGED and raw.hex() == claim and establisher != reporter:
            assert recorded is not None  # a digest claim is only ever against a record
            self._revoke(txn, object_id, index, recorded, raw, checker)
            if establisher:
                self._quarantine_in(
                    txn, establisher, f"false digest for {where}, re-checked by {checker}"
                )
            else:
                log.error(
                    "%s: the recorded digest was false (established before provenance)", where
                )
            if dispute.get("unproven"):
                # The source cannot prove content: a change outside the head since the
                # establisher's read looks the same as its lie, and the file's other
                # recorded chunks may then be of the old version. Only a new resolution
                # of the source guarantees one version.
                who = establisher or "a node"
                self._break(
                    txn,
                    object_id,
                    f"{where} differs from what {who} recorded; the source may have changed",
                )
            return "establisher-lied"
        # Matches neither, or the establisher itself now reads otherwise: the source changed.
        if changed:
            why = changed
        elif establisher == reporter:
            why = f"{reporter} and {checker} now read other bytes than {reporter} recorded"
        else:
            why = f"{checker}'s re-read matches neither the record nor {reporter}"
        self._break(txn, object_id, f"source changed: {why}")
        return "source-changed"

    def _revoke(
        self, txn: Txn, object_id: str, index: int, old: bytes, new: bytes, checker: str
    ) -> None:
        """Replace a digest proven false; whoever held those bytes drops them."""
        draft = txn.draft(object_id)
        draft.revoke(index, old)
        draft.record(index, new, checker)
        txn.after.append(lambda: self._discard(object_id, {index}))

    def _discard(self, object_id: str, indexes: set[int]) -> None:
        """Every holder of these chunks stops being one and is told to drop its copy."""
        for node in self.drop_holders(object_id, indexes):
            self.notify(node, object_id)

    def notify(self, node: str, object_id: str) -> None:
        self.notices.setdefault(node, set()).add(object_id)

    def _quarantine_in(self, txn: Txn, node: str, reason: str) -> None:
        """Quarantine `node` (inside the transaction): its open disputes are dropped and
        every digest it established is forgotten (and the copies others took of them)."""
        key = f"quarantine/{check_name('node', node)}"
        if node in self.facts.quarantine or key in txn.writes:
            return
        txn.put(key, json.dumps({"since": self.clock(), "reason": reason}).encode())
        for (object_id, index), dispute in self.facts.disputes.items():
            if dispute["reporter"] == node:
                txn.delete(dispute_key(object_id, index))
        forgotten: dict[str, set[int]] = {}
        for object_id, obj in self.facts.objects.items():
            mine = {i for i, who in obj.establisher.items() if who == node}
            if mine:
                draft = txn.draft(object_id)
                for index in mine:
                    if draft.establisher(index) == node:
                        draft.forget(index)
                forgotten[object_id] = mine
        txn.bump = True  # plans leave it out
        txn.after.append(lambda: self.trust_changed(node, False))
        for object_id, indexes in forgotten.items():
            txn.after.append(lambda o=object_id, i=indexes: self._discard(o, i))  # type: ignore[misc]
        log.error(
            "node %s quarantined: %s; %d digests it established are forgotten; lift with "
            "`syncbit node trust %s`",
            node,
            reason,
            sum(len(i) for i in forgotten.values()),
            node,
        )

    def _break(self, txn: Txn, object_id: str, reason: str) -> None:
        """Mark an object's version broken: every node refuses to serve it, and the
        datasets that list it say so until they are resolved again."""
        if object_id not in self.facts.broken:
            mark = {"since": self.clock(), "reason": reason}
            txn.put(f"broken/{object_id}", json.dumps(mark).encode())
        for name, facts in self.facts.datasets.items():
            paths = [f.path for f in facts.manifest.files if f.object.lower() == object_id]
            if paths:
                log.error(
                    "dataset %s: %s broken (%s); `syncbit dataset add` again picks up the "
                    "source's current content",
                    name,
                    ", ".join(paths),
                    reason,
                )
        txn.bump = True

    def prune_disputes(self, txn: Txn, listed: set[str]) -> None:
        """Drop disputes over objects no dataset lists any more (nobody can re-check)."""
        for object_id, index in self.facts.disputes:
            if object_id not in listed:
                txn.delete(dispute_key(object_id, index))

    # -- re-checks, quarantine, notices ------------------------------------------------------------

    async def rechecks_for(self, node: str) -> list[dict[str, Any]]:
        """The re-checks `node` is asked to do: [{"object", "chunk", "dataset", "path"}].
        Each dispute gets one checker, chosen at random among the up nodes that are neither
        its establisher nor its reporter nor quarantined, so no node can choose to be the
        judge; one that does not answer within RECHECK_TIMEOUT or goes down is replaced.
        Costs nothing when nothing is disputed (every heartbeat asks)."""
        facts = self.facts
        if not facts.disputes or node in facts.quarantine:
            return []
        now = self.clock()

        def stale(dispute: dict[str, Any]) -> bool:
            checker = dispute["checker"]
            return (
                checker is None
                or not self.eligible(checker)
                or now - dispute["asked"] > RECHECK_TIMEOUT
            )

        if not any(stale(d) for d in facts.disputes.values()):
            return [_ask(d) for d in facts.disputes.values() if d["checker"] == node]
        asks: list[dict[str, Any]] = []
        async with facts.transaction() as txn:
            eligible = {n for n in self.up() if n not in facts.quarantine}
            for (object_id, index), dispute in list(facts.disputes.items()):
                checker = dispute["checker"]
                if stale(dispute):
                    choices = eligible - {dispute["establisher"], dispute["reporter"]}
                    checker = secrets.choice(sorted(choices)) if choices else None
                    if checker != dispute["checker"] or checker is not None:
                        updated = {**dispute, "checker": checker, "asked": now}
                        txn.put(dispute_key(object_id, index), json.dumps(updated).encode())
                    if checker is not None:
                        log.info(
                            "asking %s to re-check chunk %d of %s/%s against the source",
                            checker,
                            index,
                            dispute["dataset"],
                            dispute["path"],
                        )
                if checker == node:
                    asks.append(_ask(dispute))
        return asks

    def disputes(self) -> list[dict[str, Any]]:
        """Every open dispute (at most MAX_DISPUTES), by object and chunk."""
        return [self.facts.disputes[k] for k in sorted(self.facts.disputes)]

    async def quarantine(self, node: str, reason: str) -> None:
        """Quarantine `node` by hand (an operator, or a test)."""
        async with self.facts.transaction() as txn:
            self._quarantine_in(txn, node, reason)

    async def lift_quarantine(self, node: str) -> None:
        """An operator trusts `node` again (NotFoundError if it is not quarantined). The
        digests it established were forgotten and stay so; its holdings count again."""
        async with self.facts.transaction(bump=True) as txn:
            if node not in self.facts.quarantine:
                raise NotFoundError(f"node {node!r} is not quarantined")
            txn.delete(f"quarantine/{node}")
            txn.after.append(lambda: self.trust_changed(node, True))
        log.warning("node %s: quarantine lifted by an operator", node)

    def take_notices(self, node: str) -> list[str]:
        """Objects `node` must discard its copy of (their digests were proven or are
        presumed false); each is handed out once."""
        pending = self.notices.get(node)
        if not pending:
            return []
        taken = sorted(pending)[:MAX_NOTICES]
        pending.difference_update(taken)
        if not pending:
            del self.notices[node]
        return taken


__all__ = ["CHANGED", "MAX_DISPUTES", "MAX_NOTICES", "RECHECK_TIMEOUT", "Trust", "dispute_key"]
