"""Exercise checkers: each accepts the right answer and rejects typical wrong ones with a useful hint."""
import pytest

from labkit import memory
from labkit.check import EXERCISES, check


def test_kv_cache_exercise(capsys):
    assert check("00-kv-cache", 2**30)
    assert not check("00-kv-cache", 4 * 2**30) and "KV heads" in capsys.readouterr().out
    assert not check("00-kv-cache", 2**29) and "both K and V" in capsys.readouterr().out
    assert not check("00-kv-cache", "lots")


def test_weights_exercise(capsys):
    assert check("00-weights", memory.weights_bytes(7.62e9, "Q4_K_M") / 1e9)
    assert not check("00-weights", 3.81) and "not 4.0 bits" in capsys.readouterr().out


def test_paged_blocks_exercise(capsys):
    assert check("04-paged-blocks", 1 + 1 + 2 + 7)
    assert not check("04-paged-blocks", 0 + 1 + 1 + 6) and "round *up*" in capsys.readouterr().out


def test_decode_bound_exercise():
    assert check("06-decode-bound", 1008e9 / 4.9e9)
    assert not check("06-decode-bound", 85)


def test_fits_exercise(capsys):
    from labkit.troubleshoot import fit_report
    r = fit_report("smollm2", n_ctx=32768, available_bytes=0)
    assert check("07-fits", r.weights_bytes + r.kv_bytes)
    assert not check("07-fits", r.weights_bytes) and "weights alone" in capsys.readouterr().out


def test_unanswered_and_unknown(capsys):
    assert not check("00-kv-cache", ...) and "not answered yet" in capsys.readouterr().out
    with pytest.raises(KeyError):
        check("99-nope", 1)
    assert all(e.prompt and e.chapter for e in EXERCISES.values())
