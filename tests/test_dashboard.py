"""The web dashboard over HTTP (``aioasync_tasks.dashboard``), on every backend: pages,
filters, the live stream, actions and their guards (read-only by default, the form token, the
same-origin check, basic authentication), HTML escaping, mounting, and ``/metrics`` compared
with the database. The browser tests are in ``test_dashboard_browser.py``."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from _dashboard import form_token, listed_ids, registry, steps_context
from _db import DbTarget
from _helpers import (
    BOUND,
    HERMETIC_ENV,
    LONG_BOUND,
    db_args,
    make_node,
    spawn_cli,
    wait_for,
    wait_state,
)
from aiohttp import ClientResponse, ClientSession, web
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from test_docs import plain_signature, reference_text

from aioasync_tasks import ConfigurationError, Node, State, TaskNotFound
from aioasync_tasks._cli.app import main
from aioasync_tasks._cli.dashboard import is_local
from aioasync_tasks.dashboard import aiohttp_app, create_app
from aioasync_tasks.dashboard._aiohttp import DASHBOARD

BASE = "http://dash.test"
SAME_ORIGIN = {"origin": BASE}


@asynccontextmanager
async def client_of(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


@asynccontextmanager
async def client_node(db: DbTarget) -> AsyncIterator[Node]:
    """A client-only node: tasks stay where the test puts them."""
    async with make_node(db, registry, concurrency=0) as node:
        yield node


async def post(client: httpx.AsyncClient, path: str, token: str, **fields: str) -> httpx.Response:
    return await client.post(path, data={"csrf_token": token, **fields}, headers=SAME_ORIGIN)


# -- pages ------------------------------------------------------------------------------------


async def test_overview_shows_counts_nodes_and_groups(db: DbTarget) -> None:
    async with make_node(db, registry, concurrency=2) as worker:
        await worker.create_task("steps", steps_context(1), group="a", auto_run=False)
        await worker.create_task("steps", steps_context(1), group="a", auto_run=False)
        done = await worker.create_task("steps", steps_context(1), group="b")
        await worker.wait_task(done, timeout=30)
        await worker.pause_group("b")
        await worker.set_group_limits("a", max_running=3, max_running_per_user=1)
        async with client_of(create_app(worker)) as client:
            page = await client.get("/")
    assert page.status_code == 200
    html = page.text
    assert '<td class="num" data-state="init"><a href="/tasks?group=a&amp;state=init">2</a>' in html
    assert 'data-state="finished"><a href="/tasks?group=b&amp;state=finished">1</a>' in html
    assert re.search(r'<tr data-group="b">\s*<td>b</td>\s*<td>paused</td>', html)
    assert re.search(
        r'<tr data-group="a">\s*<td>a</td>\s*<td>no</td>\s*<td class="num">3</td>', html
    )
    nodes = html.split('id="nodes"')[1].split("</table>")[0]
    assert f'<td class="num">{worker.id}</td>' in nodes
    throughput = html.split('id="throughput"')[1].split("</table>")[0]
    assert '<tr><td>1 min</td><td class="num">1</td>' in throughput
    assert 'hx-trigger="every 2s"' in html
    assert 'src="/static/htmx.min.js"' in html


async def test_static_files_are_served_from_the_package(db: DbTarget) -> None:
    async with client_node(db) as node, client_of(create_app(node)) as client:
        htmx = await client.get("/static/htmx.min.js")
        script = await client.get("/static/dashboard.js")
        css = await client.get("/static/dashboard.css")
    assert htmx.status_code == script.status_code == css.status_code == 200
    assert htmx.text.startswith("var htmx=")
    assert "EventSource" in script.text


async def test_pages_need_nothing_from_elsewhere(db: DbTarget) -> None:
    """Offline: every script, stylesheet and link of the pages is the dashboard's own."""
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        async with client_of(create_app(node, actions=True)) as client:
            pages = [await client.get(p) for p in ("/", "/tasks", f"/tasks/{task_id}")]
    for page in pages:
        urls = re.findall(r'(?:src|href|action)="([^"]*)"', page.text)
        assert urls
        assert [u for u in urls if not u.startswith(("/", "#"))] == [], page.url


async def test_task_page_shows_every_field(db: DbTarget) -> None:
    async with make_node(db, registry) as node:
        task_id = await node.create_task("steps", steps_context(4), user="ann", group="g1")
        task = await node.wait_task(task_id, timeout=30)
        async with client_of(create_app(node)) as client:
            page = await client.get(f"/tasks/{task_id}")
            missing = await client.get("/tasks/999999")
            huge = await client.get(f"/tasks/{2**70}")
    html = page.text
    assert page.status_code == 200
    assert '<span id="state" class="state finished" data-task-state="finished">' in html
    assert '<progress id="progress" value="1.0" max="1"></progress>' in html
    assert '<span id="message">step 4 of 4</span>' in html
    assert '<dd id="user">ann</dd>' in html
    assert '<dd id="group">g1</dd>' in html
    assert f'<dd id="attempts">1 of {task.max_attempts}</dd>' in html
    assert "&#34;i&#34;: 4" in html  # the context, escaped
    assert f'data-live="/tasks/{task_id}/events"' in html
    assert missing.status_code == 404
    assert "There is no task 999999." in missing.text
    assert huge.status_code == 400


async def test_everything_is_html_escaped(db: DbTarget) -> None:
    evil = "<script>alert(1)</script>"
    async with client_node(db) as node:
        task_id = await node.create_task(
            "steps", steps_context(1, note=evil), user=evil, group=evil, auto_run=False
        )
        app = create_app(node, actions=True)
        async with client_of(app) as client:
            pages = [
                await client.get("/"),
                await client.get("/tasks"),
                await client.get(f"/tasks/{task_id}"),
                await client.get("/tasks", params={"user": evil}),
                await client.get("/tasks", params={"state": evil}),
            ]
    for page in pages:
        assert "<script>alert" not in page.text, page.url
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, page.url
    assert pages[4].status_code == 400  # not a state: said, escaped


async def test_list_filters_pages_and_finds_by_id(db: DbTarget) -> None:
    async with client_node(db) as node:
        many = await node.create_tasks(
            [
                {"type": "steps", "context": steps_context(1), "user": "a", "auto_run": False}
                for _ in range(55)
            ]
        )
        b_ids = [
            await node.create_task("steps", steps_context(1), user="b", group="gb")
            for _ in range(3)
        ]
        await node.pause_task(b_ids[0])
        async with client_of(create_app(node)) as client:
            first = await client.get("/tasks", params={"user": "a"})
            second = await client.get("/tasks", params={"user": "a", "offset": "50"})
            of_b = await client.get("/tasks", params={"user": "b", "group": "gb"})
            paused = await client.get("/tasks", params={"state": "paused"})
            by_type = await client.get("/tasks", params={"type": "other"})
            found = await client.get("/tasks", params={"id": str(b_ids[1])})
            not_id = await client.get("/tasks", params={"id": "12x"})
    assert listed_ids(first.text) == sorted(many, reverse=True)[:50]
    assert "Tasks 1 to 50 of 55" in first.text
    assert 'id="next" href="/tasks?user=a&amp;offset=50"' in first.text
    assert listed_ids(second.text) == sorted(many, reverse=True)[50:]
    assert 'id="previous"' in second.text
    assert 'id="next"' not in second.text
    assert listed_ids(of_b.text) == sorted(b_ids, reverse=True)
    assert listed_ids(paused.text) == [b_ids[0]]
    assert listed_ids(by_type.text) == []
    assert "No tasks match." in by_type.text
    assert found.status_code == 303
    assert found.headers["location"] == f"/tasks/{b_ids[1]}"
    assert not_id.status_code == 400


async def test_the_list_refreshes_its_rows_with_its_filters_and_page(db: DbTarget) -> None:
    """The list page polls ``/tasks/rows`` with its own filters and offset; the fragment is
    the live part alone, and shows what changed since the page was read."""
    async with client_node(db) as node:
        older = [
            await node.create_task("steps", steps_context(1), user="a", auto_run=False)
            for _ in range(51)
        ]
        await node.create_task("steps", steps_context(1), user="other", auto_run=False)
        async with client_of(create_app(node)) as client:
            page = await client.get("/tasks", params={"user": "a", "offset": "50"})
            live = re.search(
                r'<section id="task-list" hx-get="([^"]+)" hx-trigger="([^"]+)"', page.text
            )
            assert live is not None
            rows_url = live.group(1).replace("&amp;", "&")
            newer = await node.create_task("steps", steps_context(1), user="a", auto_run=False)
            rows = await client.get(rows_url)
            first_page = await client.get("/tasks/rows", params={"user": "a"})
            bad = await client.get("/tasks/rows", params={"state": "sleeping"})
    assert rows_url == "/tasks/rows?user=a&offset=50"
    assert live.group(2) == "every 3s"
    assert listed_ids(page.text) == [older[0]]
    assert rows.status_code == 200
    assert rows.text.startswith('<section id="task-list"')
    assert "<html" not in rows.text
    assert 'id="filters"' not in rows.text
    assert listed_ids(rows.text) == older[:2][::-1]  # the new task pushed one onto this page
    assert "Tasks 51 to 52 of 52" in rows.text
    assert 'id="previous" href="/tasks?user=a&amp;offset=0"' in rows.text
    assert listed_ids(first_page.text)[0] == newer
    assert 'hx-get="/tasks/rows?user=a&amp;offset=0"' in first_page.text
    assert bad.status_code == 400


async def test_events_stream_the_task_until_it_ends(db: DbTarget) -> None:
    async with make_node(db, registry) as node:
        task_id = await node.create_task("steps", steps_context(3))
        await node.wait_task(task_id, timeout=30)
        gone = await node.create_task("steps", steps_context(1), auto_run=False)
        await node.delete_task(gone)
        async with client_of(create_app(node)) as client:
            stream = await client.get(f"/tasks/{task_id}/events")
            of_gone = await client.get(f"/tasks/{gone}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = stream.text.split("\n\n")
    assert 'data:   <span id="state" class="state finished"' in events[0]
    assert events[1] == "event: end\ndata: -"
    assert 'id="gone"' in of_gone.text
    assert of_gone.text.endswith("event: end\ndata: -\n\n")


async def test_mounted_in_fastapi_under_a_prefix(db: DbTarget) -> None:
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        api = FastAPI()
        api.mount("/tasks-admin", create_app(node, actions=True))
        async with client_of(api) as client:
            page = await client.get(f"/tasks-admin/tasks/{task_id}")
            script = await client.get("/tasks-admin/static/htmx.min.js")
            paused = await post(
                client, f"/tasks-admin/tasks/{task_id}/pause", form_token(page.text)
            )
        assert page.status_code == script.status_code == 200
        assert 'href="/tasks-admin/static/dashboard.css"' in page.text
        assert f'data-live="/tasks-admin/tasks/{task_id}/events"' in page.text
        assert f'action="/tasks-admin/tasks/{task_id}/pause"' in page.text
        assert paused.status_code == 303
        assert paused.headers["location"] == f"/tasks-admin/tasks/{task_id}"
        assert (await node.get_task(task_id)).state is State.PAUSED


async def test_from_a_url_with_a_node_of_its_own(db: DbTarget) -> None:
    """``create_app(url)`` makes a client-only node, started by the first request and stopped
    with the app's lifespan."""
    async with client_node(db) as node:  # migrates the schema
        await node.create_task("steps", steps_context(1), auto_run=False)
    app = create_app(db.url, schema=db.schema)
    source = app.state.node_source
    async with app.router.lifespan_context(app), client_of(app) as client:
        assert not source.started
        page = await client.get("/tasks")
        assert page.status_code == 200
        assert len(listed_ids(page.text)) == 1
        assert (await client.get("/metrics")).status_code == 200
        assert source.started
    assert not source.started


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def first_event(stream: ClientResponse) -> bytes:
    """The first server-sent event of a stream, read as it comes."""
    event = b""
    while not event.endswith(b"\n\n"):
        event += await stream.content.readline()
    return event


async def test_an_aiohttp_sub_application_under_a_prefix(db: DbTarget, aiohttp_client: Any) -> None:
    """``aiohttp_app`` mounted with ``add_subapp``: prefixed links, a POSTed action."""
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        app = web.Application()
        app.add_subapp("/tasks-admin", aiohttp_app(node, actions=True))
        client = await aiohttp_client(app)
        overview = await client.get("/tasks-admin/")
        page = await client.get(f"/tasks-admin/tasks/{task_id}")
        bare = await client.get("/tasks-admin", allow_redirects=False)
        html = await page.text()
        origin = str(client.make_url("")).rstrip("/")
        paused = await client.post(
            f"/tasks-admin/tasks/{task_id}/pause",
            data={"csrf_token": form_token(html)},
            headers={"origin": origin},
            allow_redirects=False,
        )
        refused = await client.post(
            f"/tasks-admin/tasks/{task_id}/run",
            data={"csrf_token": form_token(html)},
            headers={"origin": "http://elsewhere.test"},
        )
        assert overview.status == page.status == 200
        assert 'href="/tasks-admin/tasks"' in await overview.text()
        assert 'href="/tasks-admin/static/dashboard.css"' in html
        assert f'data-live="/tasks-admin/tasks/{task_id}/events"' in html
        assert f'action="/tasks-admin/tasks/{task_id}/pause"' in html
        assert page.headers["x-frame-options"] == "DENY"
        assert bare.status == 307
        assert bare.headers["location"].endswith("/tasks-admin/")
        assert paused.status == 303
        assert paused.headers["location"] == f"/tasks-admin/tasks/{task_id}"
        assert refused.status == 403
        assert (await node.get_task(task_id)).state is State.PAUSED


async def test_aiohttp_streams_the_events_as_they_come(
    db: DbTarget, aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The server-sent events of a running task arrive while it runs, not when it ends; a
    client that leaves ends the stream quietly."""
    async with make_node(db, registry, concurrency=1) as node:
        task_id = await node.create_task("steps", steps_context(100_000, 0.05))
        await wait_state(node, task_id, State.RUNNING)
        app = web.Application()
        app.add_subapp("/admin", aiohttp_app(node))
        client = await aiohttp_client(app)
        async with client.get(f"/admin/tasks/{task_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            first = await first_event(stream)
        assert b'data-task-state="running"' in first
        assert (await node.get_task(task_id)).state is State.RUNNING
        await node.delete_task(task_id, force=True)  # the stream's next write finds it gone
        await client.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_aiohttp_ends_the_stream_of_an_idle_task_when_its_client_leaves(
    db: DbTarget,
) -> None:
    """aiohttp tells no handler of a disconnect (its test server cancels handlers; a server
    started as ``web.run_app`` does does not): the bridge notices it, and the stream of a task
    that never changes ends (its handler returns)."""
    ended = asyncio.Event()

    @web.middleware
    async def watch_handlers(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            if request.path.endswith("/events"):
                ended.set()

    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        app = web.Application(middlewares=[watch_handlers])
        app.add_subapp("/admin", aiohttp_app(node))
        runner = web.AppRunner(app)  # run_app's defaults: handlers are not cancelled
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            async with (
                ClientSession() as session,
                session.get(f"http://{host}:{port}/admin/tasks/{task_id}/events") as stream,
            ):
                assert b'data-task-state="init"' in await first_event(stream)
            assert not ended.is_set()
            await asyncio.wait_for(ended.wait(), BOUND)
        finally:
            await runner.cleanup()


async def test_aiohttp_stops_the_node_of_its_own_at_cleanup(
    db: DbTarget, aiohttp_client: Any
) -> None:
    async with client_node(db):  # migrates the schema
        pass
    dashboard = aiohttp_app(db.url, schema=db.schema)
    source = dashboard[DASHBOARD].state.node_source
    app = web.Application()
    app.add_subapp("/admin", dashboard)
    client = await aiohttp_client(app)
    assert (await client.get("/admin/tasks")).status == 200
    assert source.started
    await client.close()
    assert not source.started


def test_aiohttp_app_without_aiohttp_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    monkeypatch.delitem(sys.modules, "aioasync_tasks.dashboard._aiohttp")
    with pytest.raises(ModuleNotFoundError, match=r"needs aiohttp .*pip install aiohttp"):
        from aioasync_tasks.dashboard import aiohttp_app  # noqa: F401, PLC0415 - the import is the test


# -- actions and their guards -----------------------------------------------------------------


async def test_read_only_by_default(db: DbTarget) -> None:
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        async with client_of(create_app(node)) as client:
            pages = [await client.get(p) for p in ("/", "/tasks", f"/tasks/{task_id}")]
            refused = await post(client, f"/tasks/{task_id}/run", "anything")
            group_refused = await post(client, "/groups/pause", "anything", group="default")
        assert all('method="post"' not in p.text for p in pages)
        assert all("csrf_token" not in p.text for p in pages)
        assert refused.status_code == group_refused.status_code == 403
        assert "read-only" in refused.text
        assert (await node.get_task(task_id)).state is State.INIT
        assert not (await node.get_groups())[0].paused


async def test_task_actions(db: DbTarget) -> None:
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        other = await node.create_task("steps", steps_context(1), auto_run=False)
        async with client_of(create_app(node, actions=True)) as client:
            token = form_token((await client.get(f"/tasks/{task_id}")).text)
            paused = await post(client, f"/tasks/{task_id}/pause", token)
            assert paused.status_code == 303
            assert paused.headers["location"] == f"/tasks/{task_id}"
            assert (await node.get_task(task_id)).state is State.PAUSED
            assert (await post(client, f"/tasks/{task_id}/run", token)).status_code == 303
            assert (await node.get_task(task_id)).state is State.PENDING
            moved = await post(client, f"/tasks/{task_id}/move", token, group="elsewhere")
            assert moved.status_code == 303
            assert (await node.get_task(task_id)).group == "elsewhere"
            nowhere = await post(client, f"/tasks/{task_id}/move", token, group="")
            assert nowhere.status_code == 409
            assert f"Cannot move task {task_id}" in nowhere.text
            deleted = await post(client, f"/tasks/{task_id}/delete", token)
            assert deleted.status_code == 303
            assert deleted.headers["location"] == "/tasks"
            with pytest.raises(TaskNotFound):
                await node.get_task(task_id)
            assert (
                await post(client, f"/tasks/{other}/delete", token, force="1")
            ).status_code == 303
            with pytest.raises(TaskNotFound):
                await node.get_task(other)
            assert (await post(client, f"/tasks/{other}/run", token)).status_code == 404
            assert (await post(client, f"/tasks/{other}/explode", token)).status_code == 404


async def test_group_actions(db: DbTarget) -> None:
    async with client_node(db) as node:
        await node.create_task("steps", steps_context(1), group="g", auto_run=False)
        async with client_of(create_app(node, actions=True)) as client:
            token = form_token((await client.get("/")).text)

            async def group() -> tuple[bool, int | None, int | None]:
                (found,) = [g for g in await node.get_groups() if g.name == "g"]
                return found.paused, found.max_running, found.max_running_per_user

            paused = await post(client, "/groups/pause", token, group="g")
            assert paused.status_code == 303
            assert paused.headers["location"] == "/"
            assert await group() == (True, None, None)
            assert (await post(client, "/groups/resume", token, group="g")).status_code == 303
            assert await group() == (False, None, None)
            limits = await post(
                client, "/groups/limits", token, group="g", max_running="4", max_running_per_user=""
            )
            assert limits.status_code == 303
            assert await group() == (False, 4, None)
            for bad in ("0", "x"):
                refused = await post(client, "/groups/limits", token, group="g", max_running=bad)
                assert refused.status_code == 400
            assert await group() == (False, 4, None)


async def test_posts_need_the_form_token_and_the_same_origin(db: DbTarget) -> None:
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        async with client_of(create_app(node, actions=True)) as client:
            token = form_token((await client.get(f"/tasks/{task_id}")).text)
            path = f"/tasks/{task_id}/pause"
            refused = [
                await client.post(path, data={"other": "1"}, headers=SAME_ORIGIN),
                await client.post(path, data={"csrf_token": "guess"}, headers=SAME_ORIGIN),
                await client.post(
                    path, data={"csrf_token": token}, headers={"origin": "http://evil.test"}
                ),
                await client.post(path, data={"csrf_token": token}, headers={"origin": "null"}),
                await client.post(
                    path, data={"csrf_token": token}, headers={"referer": "http://evil.test/x"}
                ),
                await client.post(
                    path, data={"csrf_token": token}, headers={"sec-fetch-site": "cross-site"}
                ),
            ]
            as_json = await client.post(path, json={"csrf_token": token}, headers=SAME_ORIGIN)
            assert [r.status_code for r in refused] == [403] * len(refused)
            assert as_json.status_code == 415
            assert (await node.get_task(task_id)).state is State.INIT
            # The token is the app's own: another app's does not pass.
            other = create_app(node, actions=True)
            async with client_of(other) as second:
                assert (await post(second, path, token)).status_code == 403
            assert (await post(client, path, token)).status_code == 303
            assert (await node.get_task(task_id)).state is State.PAUSED


async def test_processes_with_one_secret_share_the_form_token(db: DbTarget) -> None:
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), auto_run=False)
        secret = "one secret for all the workers"
        first = create_app(node, actions=True, secret=secret)
        second = create_app(node, actions=True, secret=secret)
        other = create_app(node, actions=True, secret="another secret of the cluster")
        async with client_of(first) as a, client_of(second) as b, client_of(other) as c:
            token = form_token((await a.get(f"/tasks/{task_id}")).text)
            assert secret not in token
            assert form_token((await b.get(f"/tasks/{task_id}")).text) == token
            assert (await post(c, f"/tasks/{task_id}/pause", token)).status_code == 403
            assert (await post(b, f"/tasks/{task_id}/pause", token)).status_code == 303
        assert (await node.get_task(task_id)).state is State.PAUSED


async def test_basic_auth_guards_every_request(db: DbTarget) -> None:
    def basic(user: str, password: str) -> dict[str, str]:
        encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"authorization": f"Basic {encoded}"}

    async with client_node(db) as node:
        app = create_app(node, actions=True, auth=("admin", "s3cret"))
        async with client_of(app) as client:
            for path in ("/", "/tasks", "/metrics", "/static/htmx.min.js"):
                denied = await client.get(path)
                assert denied.status_code == 401
                assert denied.headers["www-authenticate"].startswith("Basic ")
            assert (await client.get("/", headers=basic("admin", "wrong"))).status_code == 401
            assert (await client.get("/", headers={"authorization": "Basic !!"})).status_code == 401
            page = await client.get("/", headers=basic("admin", "s3cret"))
            assert page.status_code == 200
            assert "s3cret" not in page.text
            assert page.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_create_app_checks_its_arguments(db: DbTarget) -> None:
    with pytest.raises(ConfigurationError, match="Node or a database URL"):
        create_app(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="auth must be"):
        create_app(db.url, auth=("admin",))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="auth must be"):
        create_app(db.url, auth=("admin", ""))
    with pytest.raises(ConfigurationError, match="secret must be"):
        create_app(db.url, secret="short")
    with pytest.raises(ConfigurationError, match="actions must be a bool"):
        create_app(db.url, actions="yes")  # type: ignore[arg-type]
    node = Node(db.url, concurrency=0)
    with pytest.raises(ConfigurationError, match="schema"):
        create_app(node, schema="other")


async def test_a_node_not_started_is_a_503(db: DbTarget) -> None:
    node = Node(db.url, schema=db.schema, concurrency=0)
    async with client_of(create_app(node)) as client:
        page = await client.get("/tasks")
    assert page.status_code == 503
    assert "not started" in page.text


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_are_the_database_counts(db: DbTarget, raw: AsyncEngine) -> None:
    async with make_node(db, registry, concurrency=2) as worker:
        done = await worker.create_task("steps", steps_context(1), group="a")
        await worker.wait_task(done, timeout=30)
        for _ in range(3):
            await worker.create_task("steps", steps_context(1), group="b", auto_run=False)
        paused = await worker.create_task("steps", steps_context(1), group="b", auto_run=False)
        await worker.pause_task(paused)
        await worker.pause_group("c")
        for _ in range(2):
            await worker.create_task("steps", steps_context(1), group="c")
        long = await worker.create_task("steps", steps_context(1000, 0.05), group="d")
        await wait_state(worker, long, State.RUNNING)
        async with client_of(create_app(worker)) as client:
            scraped = await client.get("/metrics")
        async with raw.connect() as conn:
            rows = await conn.execute(
                sa.text(
                    "SELECT group_name, state, count(*) FROM aioasync_tasks"
                    " GROUP BY group_name, state"
                )
            )
            stored = {(g, s): n for g, s, n in rows}
            nodes = (await conn.execute(sa.text("SELECT count(*) FROM aioasync_nodes"))).scalar()
        await worker.delete_task(long, force=True)
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
    }
    tasks = {
        (dict(k[1])["group"], dict(k[1])["state"]): v
        for k, v in samples.items()
        if k[0] == "aioasync_tasks_tasks"
    }
    assert {k: v for k, v in tasks.items() if v} == stored
    assert stored[("b", "init")] == 3
    assert stored[("c", "pending")] == 2
    assert samples[("aioasync_tasks_queue_depth", (("group", "c"),))] == 2
    assert samples[("aioasync_tasks_queue_depth", (("group", "b"),))] == 0
    for state in State:
        total = sum(n for (_, s), n in stored.items() if s == state.value)
        assert samples[("aioasync_tasks_tasks_by_state", (("state", state.value),))] == total
    assert samples[("aioasync_tasks_nodes", ())] == nodes == 1
    running = (("name", worker_name(samples)), ("node", str(worker.id)))
    assert samples[("aioasync_tasks_node_running_tasks", running)] == 1
    assert 0 <= samples[("aioasync_tasks_node_heartbeat_age_seconds", running)] < 30
    assert samples[("aioasync_tasks_group_paused", (("group", "c"),))] == 1
    assert samples[("aioasync_tasks_group_paused", (("group", "a"),))] == 0
    ended = (("minutes", "1"), ("state", "finished"))
    assert samples[("aioasync_tasks_ended_recently", ended)] == 1


def worker_name(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    (name,) = [
        dict(labels)["name"]
        for metric, labels in samples
        if metric == "aioasync_tasks_node_running_tasks"
    ]
    return name


# -- the command ------------------------------------------------------------------------------


def test_is_local() -> None:
    assert is_local("127.0.0.1")
    assert is_local("127.0.0.2")
    assert is_local("::1")
    assert is_local("[::1]")
    assert is_local("localhost")
    assert not is_local("0.0.0.0")
    assert not is_local("::")
    assert not is_local("192.168.1.10")
    assert not is_local("example.com")


def test_cli_refuses_actions_on_a_public_address_without_a_login(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOASYNC_TASKS_DASHBOARD_USER", raising=False)
    monkeypatch.delenv("AIOASYNC_TASKS_DASHBOARD_PASSWORD", raising=False)
    assert main(["dashboard", "--actions", "--host", "0.0.0.0"]) == 2
    assert "needs --user and --password" in capsys.readouterr().err
    assert main(["dashboard", "--user", "admin"]) == 2
    assert "--user and --password go together" in capsys.readouterr().err


# -- the reference ----------------------------------------------------------------------------


def test_reference_shows_create_app_and_aiohttp_app_as_they_are() -> None:
    text = reference_text()
    for name, function in (("create_app", create_app), ("aiohttp_app", aiohttp_app)):
        assert f"### `dashboard.{name}`" in text
        assert plain_signature(name, function) in text


@pytest.mark.slow
async def test_cli_serves_the_dashboard(db: DbTarget, tmp_path: Path) -> None:
    async with client_node(db) as node:
        task_id = await node.create_task("steps", steps_context(1), user="cli", auto_run=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "dashboard.log"
    env = {**HERMETIC_ENV, "AIOASYNC_TASKS_DASHBOARD_PASSWORD": "pw-never-shown"}
    proc = await spawn_cli(
        *db_args(db), "dashboard", "--port", str(port), "--actions", "--user", "ops",
        cwd=tmp_path, log=log, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, auth=("ops", "pw-never-shown")) as http:

            async def up() -> bool:
                try:
                    return (await http.get("/")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(up, timeout=LONG_BOUND, what="the dashboard to answer")
            page = await http.get(f"/tasks/{task_id}")
            assert '<dd id="user">cli</dd>' in page.text
            assert (await http.get("/", auth=("ops", "wrong"))).status_code == 401
            scraped = await http.get("/metrics")
            assert 'aioasync_tasks_tasks{group="default",state="init"} 1.0' in scraped.text
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), LONG_BOUND) in (0, 130)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = log.read_text()
    assert "actions enabled, basic authentication" in output
    assert "pw-never-shown" not in output


def test_templates_and_static_files_are_package_data() -> None:
    """Every file the dashboard serves or renders is in the wheel (``package-data``)."""
    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["aioasync_tasks"]
    package = root / "aioasync_tasks"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    needed = [
        path
        for folder in ("templates", "static")
        for path in (package / "dashboard" / folder).iterdir()
        if path.is_file()
    ]
    assert {"htmx.min.js", "overview.html"} <= {path.name for path in needed}
    assert [path.name for path in needed if path not in shipped] == []
