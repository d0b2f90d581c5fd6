"""What the pages' templates share: ARNs that wrap only at their separators."""

from __future__ import annotations

from broker.web.pages import breakable


def test_breakable_adds_break_points_after_separators_only() -> None:
    arn = "arn:aws:iam::123456789012:role/BrokerDemoAdmin"
    out = str(breakable(arn))
    assert out.replace("<wbr>", "") == arn
    assert "role/<wbr>BrokerDemoAdmin" in out
    assert "BrokerDemo<wbr>" not in out  # never inside a name


def test_breakable_escapes_before_it_marks_up() -> None:
    out = str(breakable('x/<script>"'))
    assert out == "x/<wbr>&lt;script&gt;&#34;"
