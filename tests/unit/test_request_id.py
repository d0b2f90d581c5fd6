"""Request ids: well-formed ones are kept, others replaced; minted ids never repeat."""

from __future__ import annotations

import os
import re

from broker.web import request_id


def test_a_well_formed_id_is_kept_and_anything_else_replaced() -> None:
    assert request_id.accept_or_mint("abc-123_x.y") == "abc-123_x.y"
    for sent in ("", "a" * 129, "with space", "semi;colon", "\u00e9", None):
        minted = request_id.accept_or_mint(sent)
        assert minted != sent
        assert re.fullmatch(r"[0-9a-f]{32}", minted)


def test_minted_ids_are_unique_in_a_process() -> None:
    ids = [request_id.mint() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_mints_ids_its_parent_and_siblings_never_do() -> None:
    seen = {request_id.mint()}
    for _ in range(3):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: what a gunicorn worker does after the fork
            os.write(write, request_id.mint().encode())
            os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        assert re.fullmatch(r"[0-9a-f]{32}", child)
        assert child[:16] not in {s[:16] for s in seen}  # its own prefix
        seen.add(child)
