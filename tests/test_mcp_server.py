"""labkit's MCP server, driven by the MCP SDK's own client over both transports (chapter 09).

One real llama.cpp engine serves every test; a second backend points at a port where nothing
listens. Each test runs its client in ``asyncio.run``.
"""
import asyncio
import os
import secrets
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psutil
import pytest

import labkit
from labkit import mcp_server
from labkit.env import free_port
from labkit.mcp_server import Backend, MCPConfig

REPO = Path(__file__).resolve().parents[1]
TOOLS = {"search_docs", "generate", "chat", "embed", "list_models", "model_switch", "health_check"}


@pytest.fixture(scope="module")
def engine():
    with labkit.serve("llama.cpp", "smollm2") as srv:
        yield srv


@pytest.fixture(scope="module")
def down_url():
    return f"http://127.0.0.1:{free_port()}"      # nothing listens there


@pytest.fixture(scope="module")
def http(engine, down_url):
    with mcp_server.start_http([Backend.from_server(engine, "local"), f"down={down_url}"],
                               token=secrets.token_urlsafe(16)) as srv:
        yield srv


@asynccontextmanager
async def stdio_session(engine, down_url, log_path: Path):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    params = StdioServerParameters(
        command=sys.executable, cwd=str(REPO), env=dict(os.environ),   # the SDK passes only HOME, PATH... by default
        args=["-m", "labkit.mcp_server", "--backend", f"local={engine.base_url},{engine.model}",
              "--backend", f"down={down_url}"])
    with open(log_path, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


@asynccontextmanager
async def http_session(server):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    async with httpx.AsyncClient(headers=server.headers(), timeout=120) as client:
        async with streamable_http_client(server.url, http_client=client) as (read, write, _), \
                ClientSession(read, write) as session:
            await session.initialize()
            yield session


def session_for(transport, request, tmp_path):
    if transport == "stdio":
        return stdio_session(request.getfixturevalue("engine"), request.getfixturevalue("down_url"), tmp_path / "mcp.log")
    return http_session(request.getfixturevalue("http"))


def text(result) -> str:
    return "\n".join(c.text for c in result.content if hasattr(c, "text"))


# --------------------------------------------------------------------------- configuration (no engine)
def test_backend_specs_parse_and_bad_ones_are_refused():
    b = Backend.parse("local=http://127.0.0.1:8080/v1/,smollm2")
    assert (b.name, b.base_url, b.model) == ("local", "http://127.0.0.1:8080", "smollm2")
    assert Backend.parse(b.spec) == b and Backend.parse("x=http://h:1").model is None
    with pytest.raises(ValueError, match="NAME=URL"):
        Backend.parse("http://127.0.0.1:8080")
    with pytest.raises(ValueError, match="http://"):
        Backend.parse("x=127.0.0.1:8080")
    with pytest.raises(ValueError, match="unique"):
        MCPConfig(["a=http://h:1", "a=http://h:2"])
    with pytest.raises(ValueError, match="not one of the backends"):
        MCPConfig(["a=http://h:1"], default="b")
    with pytest.raises(ValueError, match="at least one backend"):
        MCPConfig([])


def test_a_corpus_folder_that_does_not_exist_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="--corpus none"):
        MCPConfig(["a=http://h:1"], corpus=str(tmp_path / "nothing-here"))
    assert MCPConfig(["a=http://h:1"], corpus=None).corpus is None
    assert MCPConfig(["a=http://h:1"]).corpus == str(labkit.rag.DOCS_DIR)      # the lab's corpus by default


def test_search_without_a_corpus_says_how_to_give_one():
    gateway = mcp_server.Gateway(MCPConfig(["a=http://h:1"], corpus=None))
    with pytest.raises(mcp_server.NoCorpusError, match="--corpus FOLDER"):
        gateway.search("anything")


@pytest.mark.engine        # loads the sentence-embedding model
def test_search_ranks_the_passage_that_answers_first_and_names_its_file(tmp_path):
    (tmp_path / "lighthouse.md").write_text("The Skerrin lighthouse was built in 1874 by the harbour board.\n")
    (tmp_path / "cheese.txt").write_text("Fenmoor blue is a soft sheep's-milk cheese aged in caves.\n")
    (tmp_path / "empty.txt").write_text("")
    gateway = mcp_server.Gateway(MCPConfig(["a=http://h:1"], corpus=str(tmp_path)))
    result = gateway.search("When was the lighthouse built?", k=2)
    assert [p["source"] for p in result["passages"]] == ["lighthouse.md", "cheese.txt"]
    assert result["passages"][0]["score"] > result["passages"][1]["score"]
    assert mcp_server.passages_text(result).startswith("[lighthouse.md] The Skerrin lighthouse was built in 1874")
    assert gateway.retriever() is gateway.retriever()          # built once, then kept
    with pytest.raises(ValueError, match="query is empty"):
        gateway.search("   ")


def test_desktop_config_starts_this_server_over_stdio():
    cfg = mcp_server.desktop_config(["local=http://127.0.0.1:8080,smollm2"])
    entry = cfg["mcpServers"]["labkit"]
    assert entry["command"] == sys.executable
    assert entry["args"][:4] == ["-m", "labkit.mcp_server", "--transport", "stdio"]
    assert entry["args"][4:] == ["--backend", "local=http://127.0.0.1:8080,smollm2"]


# --------------------------------------------------------------------------- every tool, both transports
async def check_every_tool(session, engine) -> None:
    listed = await session.list_tools()
    schemas = {t.name: t.inputSchema for t in listed.tools}
    assert set(schemas) == TOOLS
    r = await session.call_tool("search_docs", {"query": "What is the highest peak on Drest?", "k": 3})
    assert not r.isError, text(r)
    passages = r.structuredContent["passages"]
    assert len(passages) == 3 and passages[0]["doc_id"] == "drest" and "Mount Caddow" in passages[0]["text"]
    assert text(r).startswith("[drest.md] ") and "score" not in text(r)     # a model reads sources and text only
    gen = schemas["generate"]
    assert gen["required"] == ["prompt"] and gen["properties"]["prompt"]["type"] == "string"
    assert gen["properties"]["max_tokens"]["type"] == "integer" and gen["properties"]["max_tokens"]["minimum"] == 1
    role = schemas["chat"]["$defs"]["ChatMessage"]["properties"]["role"]
    assert set(role["enum"]) == {"system", "user", "assistant"}

    progress = []

    async def on_progress(done, total, message):
        progress.append((done, total))

    r = await session.call_tool("generate", {"prompt": "Name a colour.", "max_tokens": 9}, progress_callback=on_progress)
    assert not r.isError, text(r)
    out = r.structuredContent
    assert out["backend"] == "local" and out["model"] == engine.model and 0 < out["tokens"] <= 9 and out["text"]
    assert len(progress) >= 2 and all(total == 9 for _, total in progress), progress
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)     # progress only moves forward

    r = await session.call_tool("chat", {"messages": [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Hi!"}], "max_tokens": 6})
    assert not r.isError and r.structuredContent["text"], text(r)
    r = await session.call_tool("embed", {"texts": ["a lighthouse", "a lighthouse keeper", "tax law"]})
    assert not r.isError, text(r)
    vectors = r.structuredContent["vectors"]
    assert len(vectors) == 3 and len(vectors[0]) == r.structuredContent["dimensions"]
    similarity = [sum(x * y for x, y in zip(vectors[0], v)) for v in vectors[1:]]
    assert similarity[0] > similarity[1]           # the related text is the closer one: real embeddings
    r = await session.call_tool("list_models", {})
    rows = {b["name"]: b for b in r.structuredContent["backends"]}
    assert rows["local"]["served"] == [engine.model] and rows["down"]["served"] is None
    r = await session.call_tool("model_switch", {"backend": "local", "model": engine.model})
    assert not r.isError and r.structuredContent == {"backend": "local", "model": engine.model, "base_url": engine.base_url}
    r = await session.call_tool("health_check", {})
    health = {b["backend"]: b for b in r.structuredContent["backends"]}
    assert health["local"]["ok"] and health["local"]["latency_ms"] > 0 and health["local"]["error"] is None
    assert not health["down"]["ok"] and "not answering" in health["down"]["error"]
    assert r.structuredContent["healthy"] is False
    resource = await session.read_resource(mcp_server.CATALOGUE_URI)
    assert '"served"' in resource.contents[0].text and resource.contents[0].mimeType == "application/json"


@pytest.mark.full      # chapter 09 calls the tools over HTTP and test_cli over stdio in make test
@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_every_tool_answers(transport, engine, request, tmp_path):
    async def go():
        async with session_for(transport, request, tmp_path) as session:
            await check_every_tool(session, engine)
    asyncio.run(go())


# --------------------------------------------------------------------------- bad requests
async def check_bad_requests(session, engine, down_url) -> None:
    from mcp.shared.exceptions import McpError

    async def error_of(name, args) -> str:
        r = await session.call_tool(name, args)
        assert r.isError, (name, args, text(r))
        return text(r)

    assert "Unknown tool: no_such_tool" in await error_of("no_such_tool", {})
    assert "query" in await error_of("search_docs", {"query": ""})                               # min_length=1
    assert "k" in await error_of("search_docs", {"query": "x", "k": 0})                          # ge=1
    # wrong types: FastMCP validates with the pydantic model built from the signature ...
    assert "max_tokens" in (msg := await error_of("generate", {"prompt": "x", "max_tokens": "lots"})) and "integer" in msg
    assert "prompt" in (msg := await error_of("generate", {"max_tokens": 4})) and "required" in msg.lower()
    assert "role" in await error_of("chat", {"messages": [{"role": "robot", "content": "x"}]})
    assert "max_tokens" in await error_of("generate", {"prompt": "x", "max_tokens": 0})          # ge=1
    # ... in pydantic's lax mode: a numeric string is converted, not refused (what the SDK does)
    r = await session.call_tool("generate", {"prompt": "Hi", "max_tokens": "2"})
    assert not r.isError and r.structuredContent["tokens"] <= 2, text(r)
    assert "Unknown model 'no-such-model'" in await error_of("generate", {"prompt": "x", "model": "no-such-model"})
    assert "Unknown model 'no-such-model'" in await error_of("model_switch", {"backend": "local", "model": "no-such-model"})
    assert "Unknown backend 'nowhere'" in await error_of("chat", {"messages": [{"role": "user", "content": "x"}],
                                                                   "backend": "nowhere"})
    msg = await error_of("generate", {"prompt": "x", "backend": "down", "max_tokens": 2})
    assert "Backend 'down'" in msg and down_url in msg and "not answering" in msg
    with pytest.raises(McpError, match="Unknown resource"):
        await session.read_resource("models://nothing-here")
    # the server is still there, and the failed switch left the default alone
    r = await session.call_tool("generate", {"prompt": "Hi", "max_tokens": 2})
    assert not r.isError and r.structuredContent["backend"] == "local", text(r)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_bad_requests_are_tool_errors_naming_the_problem(transport, engine, down_url, request, tmp_path):
    async def go():
        async with session_for(transport, request, tmp_path) as session:
            await check_bad_requests(session, engine, down_url)
    asyncio.run(go())


# --------------------------------------------------------------------------- HTTP: token, processes
def test_http_needs_the_bearer_token(http):
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    accept = {"Accept": "application/json, text/event-stream"}
    assert httpx.post(http.url, json=body, headers=accept).status_code == 401
    wrong = httpx.post(http.url, json=body, headers={**accept, "Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]
    assert httpx.get(http.server.base_url + mcp_server.HEALTH_PATH, headers=http.headers()).status_code == 200
    assert http.server.host == "127.0.0.1"


def test_http_server_stops_without_leftovers(down_url):
    srv = mcp_server.start_http([f"down={down_url}"])
    pids = srv.pids()
    assert len(pids) >= 2 and srv.alive()          # supervisor + server
    srv.stop()
    time.sleep(0.3)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.server.base_url + mcp_server.HEALTH_PATH, timeout=2)


def test_start_http_reports_a_server_that_cannot_start(down_url):
    with pytest.raises(ValueError, match="NAME=URL"):           # refused before anything starts
        mcp_server.start_http(["not-a-spec"])
    with pytest.raises(labkit.ServerStartError, match="not one of the backends"):   # the child's error, from its log
        mcp_server.start_http([f"down={down_url}"], default="elsewhere", ready_timeout=30)


# --------------------------------------------------------------------------- LangChain
def test_langchain_gets_the_tools_through_the_adapters(http, engine):
    from langchain_mcp_adapters.client import MultiServerMCPClient

    async def go():
        client = MultiServerMCPClient({"labkit": {"transport": "streamable_http", "url": http.url,
                                                  "headers": http.headers()}})
        tools = {t.name: t for t in await client.get_tools()}
        assert set(tools) == TOOLS
        assert "prompt" in tools["generate"].args
        health = await tools["health_check"].ainvoke({})
        reply = await tools["generate"].ainvoke({"prompt": "Say hello.", "max_tokens": 4})
        return health, reply

    health, reply = asyncio.run(go())
    assert "local" in str(health) and engine.model in str(reply)
