"""Tool text shows invisible characters as escapes: Unicode's Cc, Cf, Zl and Zp, and nothing else."""

from __future__ import annotations

import json
import sys
import unicodedata

from aegisctl.mcp import results

ESCAPED_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def test_the_list_is_exactly_the_unicode_categories() -> None:
    def escaped(point: int) -> bool:
        return results.INVISIBLE.fullmatch(chr(point)) is not None

    def invisible(point: int) -> bool:
        return unicodedata.category(chr(point)) in ESCAPED_CATEGORIES or 0x13439 <= point <= 0x1343F  # Unicode 15 Cf

    wrong = [f"U+{point:04X}" for point in range(sys.maxunicode + 1) if escaped(point) != invisible(point)]
    assert wrong == []


def test_escaped_text_is_the_same_json_value() -> None:
    value = {"body": "a\x1b[2J\x9b31m\u202etxt\u200b\u2028\U000e0041\ufeff ok é 😀", "h\x85": "x"}
    result = results.ok(value)
    text = result.content[0].text  # type: ignore[union-attr]
    assert json.loads(text) == value == result.structured_content
    assert not results.INVISIBLE.search(text) and "é 😀" in text
    assert "\\u202e" in text and "\\udb40\\udc41" in text  # a tag character, as a surrogate pair


def test_an_error_message_is_escaped_too() -> None:
    result = results.error("not_granted", "service 'x\u202etxt.exe'")
    assert result.content[0].text == "not_granted: service 'x\\u202etxt.exe'"  # type: ignore[union-attr]
    assert result.structured_content == {"error": {"code": "not_granted", "message": "service 'x\u202etxt.exe'"}}
