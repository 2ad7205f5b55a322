"""Stop strings under hostile use: their size is bounded, and checking them costs a running
stream nothing it would notice."""

import httpx
import pytest

from .pace import Background, engine_cpu_s, stream_chunks


def test_a_megabyte_of_stop_strings_is_refused_with_the_limit(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "The", "max_tokens": 20, "ignore_eos": True}
    for stop, limit in (
        (["x" * 60000] * 16, "512"),  # about 1 MB
        (["x" * 513], "512"),
        (["x" * 500] * 5, "2048"),  # each within the limit, but too much together
    ):
        r = httpx.post(f"{url}/v1/completions", json={**body, "stop": stop}, timeout=60)
        assert r.status_code == 400, r.text[:200]
        error = r.json()["error"]
        assert error["param"] == "stop" and limit in error["message"], error
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": stop}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    within = {**body, "stop": ["\u2603" * 512] * 4}
    assert httpx.post(f"{url}/v1/completions", json=within, timeout=60).status_code == 200


@pytest.mark.slow
def test_stop_strings_at_the_limit_do_not_slow_another_stream(long_server):
    """Three long generations with the largest stop strings allowed run next to another
    stream; every decode step of the batch costs what it costs next to the same generations
    without stop strings. Measured as the engine thread's CPU time per step (the streams' pace
    on an idle machine, which wall-clock time on a busy one is not), the least of two rounds."""
    url, engine = long_server  # four slots: three hostile generations and the victim
    victim = {"model": "tiny", "prompt": "a", "max_tokens": 60, "ignore_eos": True, "seed": 1}
    hostile = {"model": "tiny", "prompt": [5] * 8, "max_tokens": 4000, "ignore_eos": True}

    def cost_per_step(stop: list[str]) -> float:
        others = [Background(url, {**hostile, "stop": stop, "seed": i}) for i in range(3)]
        for other in others:
            other.wait_first()
            # Let the output outgrow the stop strings: a check that depends on the output's
            # length shows by now.
            other.wait_chunks(200)
        cpu, steps = engine_cpu_s(engine), engine.stats.decode_steps
        assert len(stream_chunks(url, victim)) >= 61  # every token, and the last chunk
        cost = (engine_cpu_s(engine) - cpu) / (engine.stats.decode_steps - steps)
        for other in others:
            other.close()
        return cost

    stops = ["\u2603" * 512] * 4  # never generated: nothing matches, everything is checked
    rounds = [(cost_per_step([]), cost_per_step(stops)) for _ in range(2)]
    without, with_stops = min(r[0] for r in rounds), min(r[1] for r in rounds)
    assert with_stops < 1.5 * without, rounds
