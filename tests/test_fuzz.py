"""Randomized operation sequences on tiny models (hypothesis): after every operation the session's
invariants hold (tests/helpers.py), a failed operation changes nothing, score() never changes
memory, and save -> load gives identical logits. Plus a fault test: SIGKILL during saves.

The CI profile is bounded (a minute or two); ``AGENTMEM_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``
runs the long profile (its counts go into the README's reliability section).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from agentmem import AgentSession
from agentmem.errors import AgentMemError
from agentmem.files import temp_files
from agentmem.models import wrap_model
from tests.helpers import build_tiny, check_invariants, fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = int(os.environ.get("AGENTMEM_FUZZ_EXAMPLES", "40"))
STEPS = int(os.environ.get("AGENTMEM_FUZZ_STEPS", "16"))
WORDS = "the quick brown fox jumps over lazy dog error 0x3f2a line 42 test_parse FAILED def return ; { } \n".split(" ")
POLICIES = ["am-halve", "streaming", "truncate", "h2o", "snapkv", "kvzip", "am-fast", "am-halve-uniform"]
METHODS = [None, "am", "window", "h2o", "snapkv", "kvzip", "truncate"]
EXPECTED = (AgentMemError, ValueError, TypeError)  # refusals that must leave the session as it was
TALLY = {"sequences": 0, "operations": 0, "refused": 0}

text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=120).map(" ".join)


def _machine(loaded, tmp_path):
    PER_TOKEN = AgentSession(loaded, max_kv_mb=None).cache.bytes_for_tokens(1)

    class SessionMachine(RuleBasedStateMachine):
        """One session, random operations; every refusal is checked to have changed nothing."""

        @initialize(tokens=st.sampled_from([40, 64, 96, 160, 320, None]), policy=st.sampled_from(POLICIES))
        def start(self, tokens, policy):
            budget = None if tokens is None else PER_TOKEN * tokens / 2**20  # a budget of that many tokens
            self.s = AgentSession(loaded, max_kv_mb=budget, policy=policy)
            TALLY["sequences"] += 1

        def attempt(self, op, *args, **kwargs):
            """Run an operation; if it raises an expected error, nothing may have changed."""
            TALLY["operations"] += 1
            before = fingerprint(self.s)
            try:
                return op(*args, **kwargs)
            except EXPECTED:
                TALLY["refused"] += 1
                assert fingerprint(self.s) == before, f"{op.__name__} failed and changed the session"
                return None

        @rule(t=text, role=st.sampled_from([None, None, "user", "system", "tool"]), pin=st.booleans())
        def append(self, t, role, pin):
            self.attempt(self.s.append, t, role=role, pin=pin)

        @rule(t=st.one_of(text, st.none()), n=st.integers(0, 24), temperature=st.sampled_from([0.0, 0.8]))
        def generate(self, t, n, temperature):
            if t is None and not self.s.engine.pending:
                t = "the"
            self.attempt(self.s.generate, t, max_new_tokens=n, temperature=temperature)

        @rule(t=text, n=st.integers(1, 16))
        def chat(self, t, n):
            self.attempt(self.s.chat, t, max_new_tokens=n)

        @rule(t=text, prefix=st.sampled_from(["", " and"]))
        def score(self, t, prefix):
            before = fingerprint(self.s)
            self.attempt(self.s.score, t, prefix=prefix)
            assert fingerprint(self.s) == before, "score() changed the session"

        @rule(
            ratio=st.sampled_from([0.01, 0.1, 0.33, 0.5, 0.9, 1.0]),
            method=st.sampled_from(METHODS),
        )
        def compact(self, ratio, method):
            self.attempt(self.s.compact, ratio, method=method)

        @rule(t=text, ratio=st.sampled_from([None, 0.1, 0.5]))
        def tool_result(self, t, ratio):
            self.attempt(self.s.tool_result, "run_tests", t * 3, ratio=ratio)

        @rule(t=text, n=st.integers(1, 8))
        def recall(self, t, n):
            self.attempt(self.s.recall, t, max_lines=n)

        @rule(policy=st.sampled_from(POLICIES))
        def switch_policy(self, policy):
            def set_policy(p):
                self.s.policy = p

            self.attempt(set_policy, policy)

        @rule(
            bad=st.sampled_from(
                [
                    ("append", ("a\ud800b",), {"role": "user"}),
                    ("chat", ([{"role": "user", "content": None}],), {}),
                    ("generate", ("x",), {"temperature": float("nan")}),
                    ("generate", ("x",), {"top_p": 0.0}),
                    ("compact", (0.0,), {}),
                    ("compact", (0.5,), {"method": "no-such-method"}),
                    ("append_tokens", ([-1],), {}),
                    ("score", ("",), {}),
                ]
            )
        )
        def bad_input(self, bad):
            name, args, kwargs = bad
            before = fingerprint(self.s)
            TALLY["operations"] += 1
            with pytest.raises(EXPECTED):
                getattr(self.s, name)(*args, **kwargs)
            TALLY["refused"] += 1
            assert fingerprint(self.s) == before, f"refused {name} changed the session"

        @rule()
        def fork_is_independent(self):
            TALLY["operations"] += 1
            before = fingerprint(self.s)
            other = self.s.fork()
            try:
                other.append(" independent text", role=None)
            except EXPECTED:
                pass
            assert fingerprint(self.s) == before

        @rule()
        def save_and_load(self):
            TALLY["operations"] += 1
            path = tmp_path / "fuzz.agentmem"
            self.s.save(path)
            loaded_s = AgentSession.load(path, model=loaded)
            assert fingerprint(loaded_s) == fingerprint(self.s)
            if self.s.engine.pending:
                a, b = self.s.fork().next_logits(), loaded_s.fork().next_logits()
                assert torch.equal(a, b)
            assert temp_files(path) == []
            self.s = loaded_s

        @invariant()
        def holds(self):
            if hasattr(self, "s"):
                check_invariants(self.s)

    return SessionMachine


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_random_operation_sequences_keep_memory_sound(arch, tokenizer, tmp_path):
    loaded = wrap_model(build_tiny(arch, len(tokenizer)), tokenizer, name=f"tiny-{arch}")
    machine = _machine(loaded, tmp_path)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=EXAMPLES <= 50,  # CI: the same sequences every run
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
    print(f"\nfuzz {arch}: {TALLY}")


def test_sigkill_during_saves_never_leaves_a_bad_file(tokenizer, tmp_path):
    """A child saves two versions of a session in turn and is killed at random moments; the file
    always loads as one of them, and the next save leaves no temp files behind."""
    loaded = wrap_model(build_tiny("llama", len(tokenizer)), tokenizer, name="tiny-llama")
    versions = []
    for n in (3, 9):
        s = AgentSession(loaded, max_kv_mb=None)
        s.append("the quick brown fox jumps over the lazy dog " * n)
        versions.append(s)
    lengths = {len(v.transcript_ids) for v in versions}
    target = tmp_path / "s.agentmem"
    versions[0].save(target)
    rng = random.Random(0)
    kills = 0
    for _ in range(40):
        pid = os.fork()
        if pid == 0:  # the child: save forever
            try:
                i = 0
                while True:
                    versions[i % 2].save(target)
                    i += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        back = AgentSession.load(target, model=loaded)
        assert len(back.transcript_ids) in lengths
    versions[1].save(target)
    assert temp_files(target) == [] and kills == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.agentmem"]
