from instance.request import Detokenizer


def _byte(i: int) -> bytes:
    return bytes([i])


def _stream(text: str, stop=(), one_byte_tokens=True):
    d = Detokenizer(_byte, tuple(stop))
    deltas, stopped = [], False
    for b in text.encode():
        stopped = d.push(b)
        if stopped:
            break
        deltas.append(d.delta(False))
    if not stopped:
        d.flush()
    deltas.append(d.delta(True))
    return deltas, stopped


def test_multibyte_characters_are_emitted_whole():
    text = "naïve café — 北京 🙂!"
    deltas, _ = _stream(text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # the 4-byte emoji arrives as one delta, never as pieces
    assert "🙂" in deltas


def test_stop_string_is_cut_and_never_half_streamed():
    deltas, stopped = _stream("hello END world", stop=["END"])
    assert stopped
    assert "".join(deltas) == "hello "
    assert not any("E" in d for d in deltas)


def test_unfinished_character_at_the_end_becomes_replacement_char():
    d = Detokenizer(_byte, ())
    for b in "ab".encode() + "€".encode()[:2]:
        d.push(b)
    assert d.delta(False) == "ab"
    d.flush()
    assert d.delta(True) == "\ufffd"


def test_state_round_trip_continues_mid_character():
    text = "x€y"
    raw = text.encode()
    a = Detokenizer(_byte, ())
    for b in raw[:2]:                      # 'x' and the first byte of '€'
        a.push(b)
    out = a.delta(False)
    b_ = Detokenizer(_byte, (), a.text, a.emitted, a.pending)
    for c in raw[2:]:
        b_.push(c)
    b_.flush()
    assert out + b_.delta(True) == text
