"""The dashboard in a real browser: headless Chromium (Selenium, the system's chromedriver)
against uvicorn serving ``create_app`` of a worker node that runs real tasks, on every backend.

The server and the node run in a thread of their own, on its event loop; the test drives the
browser from the main thread and reads the database through the node (``Served.run``).
Screenshots of each step go to ``test-artifacts/<test>/<backend>/`` (``dashboard``,
``dashboard-groups``, ``dashboard-delete``; git-ignored), or under
``AIOASYNC_TASKS_TEST_ARTIFACTS`` when set. Skipped, with the reason, when there is no Chromium
or chromedriver."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from _dashboard import registry, steps_context
from _db import DbTarget
from _helpers import BOUND, make_node
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from aioasync_tasks import Group, Node, State, Task, TaskNotFound
from aioasync_tasks.dashboard import create_app

pytestmark = pytest.mark.slow

_T = TypeVar("_T")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(
    os.environ.get("AIOASYNC_TASKS_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")
)


class Served:
    """A worker node and the dashboard of it (actions enabled), served by uvicorn on a free
    local port, in a thread with its own event loop."""

    def __init__(self, db: DbTarget) -> None:
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.server: uvicorn.Server | None = None
        self._node: Node | None = None
        self.thread = threading.Thread(target=self._main, name="dashboard-server", daemon=True)

    @property
    def node(self) -> Node:
        assert self._node is not None
        return self._node

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by the test
            self.failure = exc
            self.ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        async with make_node(self.db, registry, concurrency=2) as node:
            self._node = node
            config = uvicorn.Config(
                create_app(node, actions=True),
                log_level="warning",
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
            self.server = uvicorn.Server(config)
            self.ready.set()
            await self.server.serve(sockets=[self.sock])

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(BOUND), "the dashboard server did not start"
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(BOUND)
        self.sock.close()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the server's loop (where the node lives) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(BOUND)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,860",
    ):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.skip(f"Chromium does not start: {exc.msg}")
    driver.set_page_load_timeout(BOUND)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served(db: DbTarget) -> Iterator[Served]:
    server = Served(db)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_until(driver: webdriver.Chrome, condition: Callable[[Any], Any], what: str) -> Any:
    """Wait for ``condition(driver)`` (elements replaced meanwhile are looked up again). Every
    read of a part the page replaces by itself (the live task, the overview's counts and nodes,
    the task list) goes through here: read directly, its element may go stale mid-read."""
    waiting = WebDriverWait(
        driver,
        BOUND,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    return waiting.until(condition, f"timed out waiting for {what}")


def text_of(element_id: str) -> Callable[[webdriver.Chrome], str]:
    return lambda d: d.find_element(By.ID, element_id).text


def live_state(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.ID, "state").get_attribute("data-task-state"))


def live_progress(driver: webdriver.Chrome) -> float:
    return float(driver.find_element(By.ID, "progress").get_attribute("value") or 0)


def confirm(driver: webdriver.Chrome, button_id: str) -> None:
    """Click an action's button and accept its confirmation."""
    driver.find_element(By.ID, button_id).click()
    WebDriverWait(driver, BOUND).until(expected_conditions.alert_is_present()).accept()


def listed(driver: webdriver.Chrome) -> list[int]:
    """The ids of the rows of the task list on the page."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#tasks tr[data-task]")
    return [int(r.get_attribute("data-task") or 0) for r in rows]


def screenshots(db: DbTarget, browser: webdriver.Chrome, folder: str) -> Callable[[str], None]:
    shots = ARTIFACTS / folder / db.backend
    shots.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        assert browser.save_screenshot(str(shots / f"{name}.png"))

    return shot


def test_dashboard_in_a_browser(browser: webdriver.Chrome, served: Served, db: DbTarget) -> None:
    shot = screenshots(db, browser, "dashboard")
    node = served.node
    long = steps_context(100_000, 0.05)
    alice = served.run(node.create_task("steps", long, user="alice"))
    bob = served.run(node.create_task("steps", long, user="bob"))
    waiting = served.run(
        node.create_task("steps", steps_context(5), user="bob", group="batch", auto_run=False)
    )

    def stored(task_id: int) -> Task:
        return served.run(node.get_task(task_id))

    # The overview: both tasks running on the one live node.
    browser.get(served.url + "/")
    assert browser.title == "aioasync_tasks"
    running_cell = '#counts tr[data-group="default"] td[data-state="running"]'
    wait_until(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, running_cell).text == "2",
        "2 running tasks in the overview (refreshed by htmx)",
    )
    wait_until(browser, lambda d: str(node.id) in text_of("nodes")(d), "the node listed")
    assert "batch" in browser.find_element(By.ID, "groups").text
    shot("1-overview")

    # One running task, its progress moving as the stream brings it.
    browser.get(f"{served.url}/tasks/{alice}")
    wait_until(browser, lambda d: live_state(d) == "running", "task running")
    first = wait_until(browser, lambda d: live_progress(d) > 0 and live_progress(d), "progress")
    wait_until(browser, lambda d: live_progress(d) > first, "the progress to move")
    wait_until(browser, lambda d: "of 100000" in text_of("message")(d), "the task's message")
    assert browser.find_element(By.ID, "pause").is_displayed()
    assert not browser.find_element(By.ID, "run").is_displayed()
    shot("2-task-running")

    # Pause it: PAUSED on the page and in the database; Resume is offered.
    confirm(browser, "pause")
    wait_until(browser, lambda d: live_state(d) == "paused", "task paused")
    assert stored(alice).state is State.PAUSED
    wait_until(browser, lambda d: d.find_element(By.ID, "run").is_displayed(), "Resume shown")
    assert browser.find_element(By.ID, "run").text == "Resume"
    assert not browser.find_element(By.ID, "pause").is_displayed()
    paused_at = stored(alice).progress or 0.0
    shot("3-task-paused")

    # Resume it: it runs again from its checkpoint, and its progress moves on.
    confirm(browser, "run")
    wait_until(browser, lambda d: live_state(d) == "running", "task running again")
    wait_until(browser, lambda d: live_progress(d) > paused_at, "the progress to move on")
    assert stored(alice).state is State.RUNNING
    shot("4-task-resumed")

    # Filter the list: bob's tasks, then those of them that wait.
    browser.get(served.url + "/tasks")
    browser.find_element(By.NAME, "user").send_keys("bob")
    browser.find_element(By.ID, "apply").click()
    wait_until(browser, lambda d: "user=bob" in d.current_url, "the filtered list")

    wait_until(browser, lambda d: listed(d) == [waiting, bob], "bob's tasks listed")
    Select(browser.find_element(By.NAME, "state")).select_by_value("init")
    browser.find_element(By.ID, "apply").click()
    wait_until(browser, lambda d: listed(d) == [waiting], "only the INIT task of bob")
    shot("5-tasks-filtered")

    # Move bob's running task to another group, from its page.
    browser.get(f"{served.url}/tasks/{bob}")
    wait_until(browser, lambda d: live_state(d) == "running", "bob's task running")
    browser.find_element(By.ID, "move-group").send_keys("batch")
    confirm(browser, "move")
    wait_until(browser, lambda d: text_of("group")(d) == "batch", "the task in group batch")
    assert stored(bob).group == "batch"
    shot("6-task-moved")

    served.run(node.delete_task(alice, force=True))
    served.run(node.delete_task(bob, force=True))


def test_groups_are_paused_limited_and_resumed(
    browser: webdriver.Chrome, served: Served, db: DbTarget
) -> None:
    shot = screenshots(db, browser, "dashboard-groups")
    node = served.node
    served.run(node.create_task("steps", steps_context(1), group="batch", auto_run=False))
    row = '#groups tr[data-group="batch"]'

    def cells(d: webdriver.Chrome) -> list[str]:
        """The row's first four cells: none while the page that an action loads is not
        there yet (so the conditions below compare slices, never index)."""
        return [td.text for td in d.find_elements(By.CSS_SELECTOR, f"{row} td")][:4]

    def group() -> Group:
        return next(g for g in served.run(node.get_groups()) if g.name == "batch")

    def act(button: str) -> None:
        """Click a button of the group's row and accept its confirmation."""
        browser.find_element(By.CSS_SELECTOR, f'{row} button[name="{button}"]').click()
        WebDriverWait(browser, BOUND).until(expected_conditions.alert_is_present()).accept()

    browser.get(served.url + "/")
    wait_until(browser, lambda d: cells(d) == ["batch", "no", "-", "-"], "batch not paused")
    shot("1-group")

    act("pause-group")
    wait_until(browser, lambda d: cells(d)[1:2] == ["paused"], "batch marked paused")
    assert group().paused
    assert browser.find_elements(By.CSS_SELECTOR, f'{row} button[name="pause-group"]') == []
    shot("2-group-paused")

    browser.find_element(By.CSS_SELECTOR, f'{row} input[name="max_running"]').send_keys("3")
    browser.find_element(By.CSS_SELECTOR, f'{row} input[name="max_running_per_user"]').send_keys(
        "1"
    )
    act("set-limits")
    wait_until(browser, lambda d: cells(d)[2:] == ["3", "1"], "the limits shown")
    assert (group().max_running, group().max_running_per_user) == (3, 1)
    shot("3-group-limited")

    act("resume-group")
    wait_until(browser, lambda d: cells(d) == ["batch", "no", "3", "1"], "batch resumed")
    assert not group().paused
    shot("4-group-resumed")


def test_the_list_refreshes_and_tasks_are_deleted(
    browser: webdriver.Chrome, served: Served, db: DbTarget
) -> None:
    shot = screenshots(db, browser, "dashboard-delete")
    node = served.node
    long = steps_context(100_000, 0.05)
    first = served.run(node.create_task("steps", long, user="carol"))

    # The list, filtered: a task created after the page loaded appears without a reload.
    browser.get(served.url + "/tasks?user=carol")
    wait_until(browser, lambda d: listed(d) == [first], "carol's first task listed")
    browser.execute_script("window.loadedOnce = true;")  # gone if the page were reloaded
    second = served.run(node.create_task("steps", long, user="carol"))
    served.run(node.create_task("steps", steps_context(1), user="dave", auto_run=False))
    wait_until(browser, lambda d: listed(d) == [second, first], "the new task listed")
    assert browser.execute_script("return window.loadedOnce === true;")
    assert "user=carol" in browser.current_url
    shot("1-list-refreshed")

    # Delete a running task from its page: it is stopped, then gone from the list.
    browser.get(f"{served.url}/tasks/{first}")
    wait_until(browser, lambda d: live_state(d) == "running", "the first task running")
    shot("2-task-to-delete")
    confirm(browser, "delete")
    wait_until(browser, lambda d: d.find_elements(By.ID, "tasks"), "back on the list")
    wait_until(browser, lambda d: first not in listed(d), "the deleted task gone from the list")
    with pytest.raises(TaskNotFound):
        served.run(node.get_task(first))
    shot("3-task-deleted")

    # Force-delete the other one: no cleanup, removed at once.
    browser.get(f"{served.url}/tasks/{second}")
    wait_until(browser, lambda d: live_state(d) == "running", "the second task running")
    browser.find_element(By.ID, "force").click()
    confirm(browser, "delete")
    wait_until(browser, lambda d: d.find_elements(By.ID, "tasks"), "back on the list")
    with pytest.raises(TaskNotFound):
        served.run(node.get_task(second))
    wait_until(browser, lambda d: second not in listed(d), "the task gone from the list")
    shot("4-task-force-deleted")
