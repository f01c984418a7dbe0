"""DanbooruClient: posts.json with cursor paging, auth, rate limit, retries; verified downloads.

Why it looks like this (Danbooru's documented API behaviour):
- Offset pages are capped (HTTP 410 past page 1000) and skip or repeat posts while uploads
  arrive, so listing walks `page=b<id>` / `page=a<id>` cursors and keeps a seen-id set.
- Danbooru allows at most 10 requests/s and asks for ~1/s; API calls go through one limiter.
  Image downloads come from the CDN and are not throttled by it: a fetch downloads a few files
  at once (:meth:`DanbooruClient.download_many`), with at most a few connections to one file
  host in the whole process, however many clients (the flow's parallel shards) there are.
- The API key travels only as HTTP Basic auth on API requests, never in URLs, logs, reprs or
  errors, and never to the CDN host.
- A read timeout bounds only the wait for the next byte, so a file server that trickles bytes
  would hold a download forever: every file also has a deadline and a minimum rate
  (:mod:`lora.booru.deadline`), and one stuck file costs at most its deadline.
"""
from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from lora.booru.credentials import Credentials
from lora.booru.deadline import Deadline, GuardedAdapter, StallMeter
from lora.booru.errors import TAG_LIMIT_HINT, BooruAuthError, BooruError, BooruQueryError, DownloadError
from lora.booru.posts import MalformedPost, Post, PostFormatError
from lora.booru.query import check_tag_limit
from lora.booru.ratelimit import RateLimiter
from lora.fsutil import atomic_write

log = logging.getLogger("lora.booru")

DEFAULT_URL = "https://danbooru.donmai.us"
MAX_REQUESTS_PER_SECOND = 10.0
MAX_LIMIT = 200
ANONYMOUS_TAG_LIMIT = 2
MAX_RETRY_AFTER = 300.0
_CHUNK = 1 << 16
#: Global cap on one download, whatever the post declares (Danbooru's own upload limit is
#: 50 MB for most accounts; a larger answer is a broken or hostile server).
DEFAULT_MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
#: A server may send a few bytes more than the post's declared ``file_size`` (re-encoded
#: metadata); anything beyond this margin is not the file the post describes.
SIZE_MARGIN_BYTES = 64 * 1024
SIZE_MARGIN_FRACTION = 0.01
MAX_REDIRECTS = 5
#: The per-file deadline when none is given: a file may take max(60 s, its size limit at
#: 64 KiB/s), so a 10 MB PNG gets ~160 s and the 50 MiB cap ~13 minutes.
MIN_FILE_DEADLINE_S = 60.0
DEADLINE_MIN_RATE = 64 * 1024
#: A download slower than STALL_MIN_RATE bytes/s for stall_timeout seconds is given up.
DEFAULT_STALL_TIMEOUT_S = 30.0
STALL_MIN_RATE = 1024
#: Files a fetch downloads at once, and the most connections to one file host at any time in
#: this process (shared by every client: the flow runs download shards side by side).
DEFAULT_DOWNLOAD_WORKERS = 4
DEFAULT_CONNECTIONS_PER_HOST = 4

K = TypeVar("K")

_HOST_SLOTS: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_HOST_SLOTS_LOCK = threading.Lock()


def _host_slots(host: str, limit: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore of ``host`` for clients with this per-host ``limit``."""
    with _HOST_SLOTS_LOCK:
        return _HOST_SLOTS.setdefault((host, limit), threading.BoundedSemaphore(limit))


class FileJob(NamedTuple, Generic[K]):
    """One file for :meth:`DanbooruClient.download_many`: ``key`` comes back with its result."""

    key: K
    post: Post
    dest: Path
    md5: str | None = None
#: File hosts of the real Danbooru family: images come from its CDN (cdn.donmai.us) and older
#: mirrors on the same domain. A booru on one of these domains may serve files from any of them.
KNOWN_FILE_DOMAINS = ("donmai.us",)

OnMalformed = Callable[[MalformedPost], None]


def normalize_host(value: str) -> str:
    """A host name as the user wrote it for ``--allow-file-host`` (``*.example.com`` allowed),
    lower-cased; ValueError naming the problem otherwise."""
    host = (value or "").strip().lower().rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if not bare or any(c in bare for c in "/:@ ?#*") or bare.startswith(".") or ".." in bare:
        raise ValueError(
            f"file host {value!r}: give a host name such as files.example.com or *.example.com "
            "(no scheme, port or path)"
        )
    return host


def _domain_of(host: str) -> str | None:
    for domain in KNOWN_FILE_DOMAINS:
        if host == domain or host.endswith("." + domain):
            return domain
    return None


def max_download_size(declared: int, cap: int) -> int:
    """How many bytes a download may have: the declared size plus a small margin, never more
    than ``cap`` (unknown sizes, 0, get the cap)."""
    if declared and declared > 0:
        margin = max(SIZE_MARGIN_BYTES, int(declared * SIZE_MARGIN_FRACTION))
        return min(cap, declared + margin)
    return cap


def _version() -> str:
    try:
        return metadata.version("animelora")
    except metadata.PackageNotFoundError:
        return "0"


def default_user_agent(login: str | None = None) -> str:
    """A descriptive, non-browser agent naming the tool (and the user), as Danbooru expects."""
    ua = f"animelora/{_version()} (+https://github.com/animelora/animelora)"
    return f"{ua} user:{login}" if login else ua


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        return str(body.get("message") or body.get("reason") or "")
    return ""


class DanbooruClient:
    """Reads posts from a Danbooru (or compatible) server and downloads their files."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        credentials: Credentials | None = None,
        user_agent: str | None = None,
        requests_per_second: float = 1.0,
        max_retries: int = 5,
        timeout: float = 30.0,
        backoff_base: float = 1.0,
        file_hosts: Iterable[str] = (),
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        file_deadline: float | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
        stall_min_rate: float = STALL_MIN_RATE,
        max_connections_per_host: int = DEFAULT_CONNECTIONS_PER_HOST,
    ) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {base_url!r}")
        rps = float(requests_per_second)
        if not rps > 0:
            raise ValueError(f"requests_per_second: must be positive, got {requests_per_second!r}")
        if rps > MAX_REQUESTS_PER_SECOND:
            raise ValueError(
                f"requests_per_second: {requests_per_second} exceeds Danbooru's limit of "
                f"{MAX_REQUESTS_PER_SECOND:g} requests/s (staff ask for about 1/s)"
            )
        if max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {max_retries!r}")
        if timeout <= 0:
            raise ValueError(f"timeout: must be positive, got {timeout!r}")
        if max_download_bytes <= 0:
            raise ValueError(f"max_download_bytes: must be positive, got {max_download_bytes!r}")
        if file_deadline is not None and not file_deadline > 0:
            raise ValueError(f"file_deadline: must be positive seconds, got {file_deadline!r}")
        if max_connections_per_host < 1:
            raise ValueError(f"max_connections_per_host: must be >= 1, got {max_connections_per_host!r}")
        if not stall_timeout > 0 or stall_min_rate < 0:
            raise ValueError(f"stall_timeout must be positive and stall_min_rate >= 0, got "
                             f"{stall_timeout!r} and {stall_min_rate!r}")
        self.base_url = base_url.rstrip("/")
        self.host = (urlsplit(self.base_url).hostname or "").lower()
        self.file_hosts = tuple(dict.fromkeys(normalize_host(h) for h in file_hosts))
        self.max_download_bytes = int(max_download_bytes)
        self.credentials = credentials
        self.user_agent = user_agent or default_user_agent(credentials.login if credentials else None)
        self.requests_per_second = rps
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.backoff_base = float(backoff_base)
        self.file_deadline = None if file_deadline is None else float(file_deadline)
        self.stall_timeout = float(stall_timeout)
        self.stall_min_rate = float(stall_min_rate)
        self.max_connections_per_host = int(max_connections_per_host)
        self._active: set[Deadline] = set()  # downloads in progress, cut by abort_downloads()
        self._active_lock = threading.Lock()
        self._limiter = RateLimiter(rps)
        self._api = requests.Session()
        self._api.headers.update({"User-Agent": self.user_agent, "Accept": "application/json"})
        if credentials is not None:
            self._api.auth = (credentials.login, credentials.api_key)
        # Downloads go to the CDN: a separate session without credentials.
        self._files = requests.Session()
        self._files.headers.update({"User-Agent": self.user_agent})
        pool = max(10, self.max_connections_per_host)
        for prefix in ("http://", "https://"):
            self._files.mount(prefix, GuardedAdapter(pool_maxsize=pool))

    def __repr__(self) -> str:
        who = self.credentials.login if self.credentials else "anonymous"
        return f"DanbooruClient({self.base_url!r}, user={who!r}, requests_per_second={self.requests_per_second:g})"

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        self._api.close()
        self._files.close()

    def __enter__(self) -> "DanbooruClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API -------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        return min(60.0, self.backoff_base * (2**attempt)) * random.uniform(1.0, 1.25)

    def _get_json(self, path: str, params: dict[str, Any]) -> Any:
        """GET an API path with rate limiting, retries and errors that say what to fix."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        last: str = ""
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            log.debug("GET %s %s", url, params)
            try:
                resp = self._api.get(url, params=params, timeout=self.timeout)
            except requests.Timeout:
                last, delay = f"timed out after {self.timeout:g} s", self._backoff(attempt)
            except requests.ConnectionError as exc:
                last, delay = f"connection error ({type(exc).__name__})", self._backoff(attempt)
            else:
                status = resp.status_code
                if status < 400:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        raise BooruError(f"{url}: the server answered {status} with a body that is not JSON") from exc
                self._raise_for_fatal(resp)
                if status == 429:
                    ra = _retry_after_seconds(resp.headers.get("Retry-After"))
                    if ra is not None and ra > MAX_RETRY_AFTER:
                        raise BooruError(
                            f"Danbooru throttled the client (429) and asks to wait {ra:.0f} s; "
                            "lower requests_per_second and try again later"
                        )
                    delay = ra if ra is not None else self._backoff(attempt)
                    last = "throttled (429)"
                elif status >= 500 or status == 408:
                    delay, last = self._backoff(attempt), f"server error {status}"
                else:
                    msg = _server_message(resp)
                    raise BooruError(f"{url}: HTTP {status}" + (f": {msg}" if msg else ""))
            if attempt >= self.max_retries:
                break
            log.warning("Danbooru request %s: %s; retrying in %.1f s (attempt %d of %d)",
                        path, last, delay, attempt + 1, self.max_retries)
            time.sleep(delay)
        raise BooruError(f"{url}: giving up after {self.max_retries + 1} attempts: {last}")

    def _raise_for_fatal(self, resp: requests.Response) -> None:
        status = resp.status_code
        msg = _server_message(resp)
        said = f" (server said: {msg})" if msg else ""
        if status == 401:
            raise BooruAuthError(
                "Danbooru rejected the credentials (401 Unauthorized): check DANBOORU_LOGIN and "
                "DANBOORU_API_KEY (the API key from your profile, not the password)" + said
            )
        if status == 403:
            raise BooruAuthError(
                f"Danbooru refused the request (403 Forbidden): the User-Agent {self.user_agent!r} may be "
                "blocked (default library and browser agents are; use a descriptive one), or the API "
                "key lacks the scope for posts.json (check its permissions)" + said
            )
        if status == 422:
            raise BooruQueryError(f"Danbooru refused the query (422){said}: {TAG_LIMIT_HINT}")
        if status == 410:
            raise BooruError(
                "Danbooru refused the page (410 Gone): numbered pages stop at page 1000 (5000 for Gold); "
                "walk with cursor pages (iter_posts, page=b<id>) instead" + said
            )

    def get_posts(
        self,
        tags: str,
        *,
        page: str | int | None = None,
        limit: int = MAX_LIMIT,
        on_malformed: OnMalformed | None = None,
    ) -> list[Post]:
        """One page of posts.json, newest first. `page` is N, "b<id>" or "a<id>".

        An item that is not a readable post (an id that is not a number, a field of the wrong
        type) is left out and handed to ``on_malformed`` (logged when None): one broken entry
        must not cost the rest of the page.
        """
        return self._get_page(tags, page=page, limit=limit, on_malformed=on_malformed)[0]

    def _get_page(
        self,
        tags: str,
        *,
        page: str | int | None,
        limit: int,
        on_malformed: OnMalformed | None,
    ) -> tuple[list[Post], int]:
        """(readable posts, number of items the server listed)."""
        if self.credentials is None:
            check_tag_limit(tags, ANONYMOUS_TAG_LIMIT)
        params: dict[str, Any] = {"tags": tags, "limit": max(1, min(MAX_LIMIT, int(limit)))}
        if page is not None:
            params["page"] = page
        data = self._get_json("posts.json", params)
        if not isinstance(data, list):
            raise BooruError(f"posts.json: expected a JSON list, got {type(data).__name__}")
        posts: list[Post] = []
        for item in data:
            try:
                posts.append(Post.from_json(item))
            except (PostFormatError, ValueError, TypeError) as exc:
                error = exc if isinstance(exc, PostFormatError) else PostFormatError("post", str(exc))
                bad = MalformedPost.from_item(item, error)
                log.warning("posts.json: skipped a malformed post (%s): %s", bad.key, bad.message)
                if on_malformed is not None:
                    on_malformed(bad)
        return posts, len(data)

    def iter_posts(
        self,
        tags: str,
        *,
        before_id: int | None = None,
        after_id: int | None = None,
        limit: int = MAX_LIMIT,
        max_posts: int | None = None,
        on_malformed: OnMalformed | None = None,
    ) -> Iterator[Post]:
        """Every post matching `tags`, once each, by cursor pages.

        Without after_id: newest first, walking older (`page=b<id>`) from before_id (or the
        newest post). With after_id: only posts with id > after_id, yielded oldest first
        (each `page=a<id>` holds the next ids above the cursor, listed newest first), so a
        caller may save the last yielded id as its cursor at any point. Malformed items go to
        ``on_malformed`` (see :meth:`get_posts`); a short last page of nothing but malformed
        items ends the walk, a full one is an error (the cursor cannot move past it).
        """
        if before_id is not None and after_id is not None:
            raise ValueError("iter_posts: give before_id or after_id, not both")
        if max_posts is not None and max_posts <= 0:
            return
        seen: set[int] = set()
        yielded = 0
        newer = after_id is not None
        cursor: int | None = after_id if newer else before_id
        while True:
            page = (f"a{cursor}" if newer else (f"b{cursor}" if cursor is not None else None))
            posts, listed = self._get_page(tags, page=page, limit=limit, on_malformed=on_malformed)
            if not posts:
                if listed >= max(1, min(MAX_LIMIT, int(limit))):
                    raise BooruError(
                        f"posts.json page {page or 1}: none of its {listed} posts is readable, so "
                        "the walk cannot continue past it; the server's answers are malformed"
                    )
                return
            ids = [p.id for p in posts]
            nxt = max(ids) if newer else min(ids)
            posts.sort(key=lambda p: p.id, reverse=not newer)
            for post in posts:
                if post.id in seen:
                    continue
                seen.add(post.id)
                yield post
                yielded += 1
                if max_posts is not None and yielded >= max_posts:
                    return
            if cursor is not None and (nxt <= cursor if newer else nxt >= cursor):
                log.warning("posts.json ignored the cursor page %s; stopping", page)
                return
            cursor = nxt

    # -- downloads ---------------------------------------------------------------------
    def file_host_allowed(self, host: str) -> bool:
        """Whether files may come from ``host``: the booru's own host, a known file host of its
        family (Danbooru's CDN on donmai.us), or one the user allowed (``file_hosts``)."""
        host = (host or "").lower().rstrip(".")
        if not host:
            return False
        if host == self.host:
            return True
        domain = _domain_of(self.host)
        if domain is not None and _domain_of(host) == domain:
            return True
        for allowed in self.file_hosts:
            if allowed.startswith("*.") and host.endswith(allowed[1:]):
                return True
            if host == allowed:
                return True
        return False

    def _check_file_url(self, url: str) -> None:
        """Refuse a file URL (or a redirect target) that is not http(s) on an allowed host."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(
                f"unsupported-url-scheme:{scheme or 'none'}",
                f"file URL {url[:200]!r} is not an http(s) URL; only http and https are fetched",
            )
        host = (parts.hostname or "").lower()
        if not self.file_host_allowed(host):
            raise DownloadError(
                f"file-host-not-allowed:{host or 'none'}",
                f"file URL host {host!r} is not the booru's host ({self.host}) or a known file host; "
                f"allow it with --allow-file-host {host}" if host else f"file URL {url[:200]!r} names no host",
            )

    def deadline_for(self, declared: int = 0) -> float:
        """Seconds one file may take in all: ``file_deadline`` when set, else max(60 s, its size
        limit at 64 KiB/s) (the size limit: declared size plus margin, or the global cap)."""
        if self.file_deadline is not None:
            return self.file_deadline
        limit = max_download_size(declared, self.max_download_bytes)
        return max(MIN_FILE_DEADLINE_S, limit / DEADLINE_MIN_RATE)

    def download(
        self,
        post_or_url: Post | str,
        dest: str | os.PathLike[str],
        *,
        md5: str | None = None,
        retries: int = 3,
        max_bytes: int | None = None,
        stop: threading.Event | None = None,
    ) -> Path:
        """Fetch a file to `dest` atomically, verifying its md5 (a Post's md5 by default).

        The bytes stream into a temporary file beside dest and are moved into place only when
        complete and verified, so dest is either absent or whole. Up to `retries` retries
        after the first try; then DownloadError(reason) with nothing left behind.

        Limits, checked before and while reading: the URL and every redirect hop must be
        http(s) on an allowed host (:meth:`file_host_allowed`), and at most ``max_bytes`` are
        read (default: the post's declared ``file_size`` plus a small margin, never more than
        ``max_download_bytes``). Breaking a limit is not retried: reason
        ``unsupported-url-scheme:<scheme>``, ``file-host-not-allowed:<host>``,
        ``too-many-redirects`` or ``oversized``.

        Time: the whole call, retries and their waits included, ends by :meth:`deadline_for`
        (reason ``deadline-exceeded``), and a transfer slower than ``stall_min_rate`` bytes/s
        for ``stall_timeout`` seconds is given up (``stalled``, retried while the deadline
        leaves time). The caller records such a file as failed, to be tried again later.

        At most ``max_connections_per_host`` downloads from one host run at once in this process
        (the deadline starts once this one has its turn); a set ``stop`` gives up the wait
        (reason ``cancelled``).
        """
        declared = 0
        if isinstance(post_or_url, Post):
            url = post_or_url.file_url
            declared = post_or_url.file_size
            if md5 is None:
                md5 = post_or_url.md5
            if not url:
                raise DownloadError("no-file-url", f"post {post_or_url.id} has no file_url")
        else:
            url = str(post_or_url)
        if url.startswith("//"):
            url = "https:" + url
        elif not urlsplit(url).scheme:
            url = urljoin(self.base_url + "/", url)
        self._check_file_url(url)
        limit = max_bytes if max_bytes is not None else max_download_size(declared, self.max_download_bytes)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        want = md5.lower() if md5 else None
        failure = DownloadError("connection-error")
        host = (urlsplit(url).hostname or "").lower()
        with self._file_host_slot(host, stop), Deadline(self.deadline_for(declared)) as deadline, \
                self._tracked(deadline):
            if stop is not None and stop.is_set():
                deadline.expire()  # stopped between taking the slot and being tracked
            for attempt in range(max(0, retries) + 1):
                try:
                    self._download_once(url, dest, want, limit, deadline)
                    return dest
                except DownloadError as exc:
                    failure = exc
                    retryable = exc.reason in {"md5-mismatch", "truncated", "timeout", "stalled",
                                               "connection-error", "http-408", "http-429"} \
                        or exc.reason.startswith("http-5")
                    if not retryable or attempt >= retries:
                        break
                    delay = min(getattr(exc, "retry_after", None) or self._backoff(attempt), MAX_RETRY_AFTER)
                    if delay >= deadline.remaining():
                        failure = _deadline_error(deadline, f"the last try failed ({exc.reason})")
                        break
                    log.warning("download %s failed (%s); retrying in %.1f s (attempt %d of %d)",
                                url, exc.reason, delay, attempt + 1, retries)
                    time.sleep(delay)
        raise DownloadError(failure.reason, f"download of {url} failed: {failure}")

    def download_many(self, jobs: Iterable[FileJob[K]], *, workers: int = DEFAULT_DOWNLOAD_WORKERS,
                      retries: int = 3) -> Iterator[tuple[K, Path | DownloadError]]:
        """Download ``jobs`` on ``workers`` threads; yield ``(key, dest or its DownloadError)``
        as each one ends.

        Completion order, so a slow file holds nothing up: a caller that needs a fixed order
        (the manifest's) puts results back by key. Each download keeps every limit of
        :meth:`download`. Other exceptions propagate; leaving the loop early (an exception, a
        break, Ctrl-C) cuts the downloads in progress and drops those not started.
        """
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers!r}")
        stop = threading.Event()

        def run(job: FileJob[K]) -> Path | DownloadError:
            try:
                return self.download(job.post, job.dest, md5=job.md5, retries=retries, stop=stop)
            except DownloadError as exc:
                return exc

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
        futures: dict[Future[Path | DownloadError], K] = {}
        try:
            for job in jobs:
                futures[pool.submit(run, job)] = job.key
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield futures[future], future.result()
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self.abort_downloads()
            pool.shutdown(wait=True)

    def abort_downloads(self) -> None:
        """Cut every download of this client in progress (they fail as ``deadline-exceeded``)."""
        with self._active_lock:
            active = list(self._active)
        for deadline in active:
            deadline.expire()

    def _file_host_slot(self, host: str, stop: threading.Event | None) -> "_Slot":
        return _Slot(_host_slots(host, self.max_connections_per_host), stop)

    def _tracked(self, deadline: Deadline) -> "_Tracked":
        return _Tracked(self._active, self._active_lock, deadline)

    def _open_file(self, url: str, deadline: Deadline) -> requests.Response:
        """GET a file URL, following redirects one hop at a time so each hop's target is checked."""
        # The read timeout is at most the stall window: a server that sends nothing at all is
        # a stall too, noticed as soon as one is.
        timeout = (self.timeout, min(self.timeout, self.stall_timeout))
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._files.get(url, stream=True, timeout=timeout, allow_redirects=False)
            if resp.status_code not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location")
            resp.close()
            deadline.release()
            if not location:
                raise DownloadError(f"http-{resp.status_code}", f"redirect without a Location from {url}")
            url = urljoin(url, location)
            self._check_file_url(url)
        raise DownloadError("too-many-redirects", f"more than {MAX_REDIRECTS} redirects")

    def _read_body(self, resp: requests.Response, fh: Any, digest: Any, limit: int, deadline: Deadline,
                   meter: StallMeter) -> None:
        """Copy the body to ``fh`` as bytes arrive, within the size limit, the deadline and the
        minimum rate (``meter.received`` counts the bytes)."""
        raw = resp.raw
        # read1 returns what one socket read gave, so the checks run as each byte trickles in;
        # read(n) would wait for n bytes (urllib3 < 2.3 has only that: the deadline still holds).
        read = getattr(raw, "read1", None) or raw.read
        while True:
            chunk = read(_CHUNK, decode_content=True)
            if not chunk:
                if deadline.expired:  # the deadline's timer cut the connection: not the file's end
                    raise _deadline_error(deadline, f"{meter.received} bytes received")
                return
            meter.add(len(chunk))
            if meter.received > limit:
                raise DownloadError("oversized", f"the server sent more than {limit} bytes, "
                                                 "over the limit for this file; stopped reading")
            fh.write(chunk)
            digest.update(chunk)
            if deadline.expired:
                raise _deadline_error(deadline, f"{meter.received} bytes received")
            if meter.stalled():
                raise _stall_error(self.stall_timeout, self.stall_min_rate, meter.received)

    def _transfer_error(self, exc: BaseException, deadline: Deadline, url: str, dest: Path,
                        received: int) -> DownloadError:
        """The DownloadError for a failure while connecting or reading (not a limit)."""
        if deadline.expired:  # the deadline's timer cut the connection
            return _deadline_error(deadline, f"{received} bytes received")
        if isinstance(exc, requests.ConnectTimeout):
            return DownloadError("timeout", f"no connection within {self.timeout:g} s")
        if isinstance(exc, (requests.Timeout, ReadTimeoutError)):
            # The read timeout is min(timeout, stall_timeout): silence that long is a stall.
            return _stall_error(min(self.timeout, self.stall_timeout), self.stall_min_rate, received)
        if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError,
                            Urllib3Error)):
            return DownloadError("truncated", f"connection dropped after {received} bytes")
        if isinstance(exc, requests.ConnectionError):
            return DownloadError("connection-error", f"connection error ({type(exc).__name__})")
        if isinstance(exc, requests.RequestException):
            return DownloadError("bad-file-url", f"cannot fetch {url[:200]!r}: {type(exc).__name__}")
        return DownloadError("io-error", f"cannot write {dest}: {exc}")

    def _download_once(self, url: str, dest: Path, md5: str | None, limit: int, deadline: Deadline) -> None:
        def fetch(tmp: Path) -> None:
            digest = hashlib.md5()
            meter = StallMeter(self.stall_timeout, self.stall_min_rate)
            expected = None
            try:
                with open(tmp, "wb") as fh, self._open_file(url, deadline) as resp:
                    if resp.status_code >= 400:
                        err = DownloadError(f"http-{resp.status_code}", f"HTTP {resp.status_code} for {url}")
                        if resp.status_code == 429:
                            err.retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))  # type: ignore[attr-defined]
                        raise err
                    expected = resp.headers.get("Content-Length")
                    if expected is not None and expected.isdigit() and int(expected) > limit:
                        raise DownloadError("oversized", f"the server announces {expected} bytes, over the "
                                                         f"limit of {limit} for this file")
                    self._read_body(resp, fh, digest, limit, deadline, meter)
                    fh.flush()
                    os.fsync(fh.fileno())
            except DownloadError:
                raise
            except (requests.RequestException, Urllib3Error, OSError) as exc:
                raise self._transfer_error(exc, deadline, url, dest, meter.received) from exc
            finally:
                deadline.release()
            if expected is not None and expected.isdigit() and int(expected) != meter.received:
                raise DownloadError("truncated", f"got {meter.received} of {expected} bytes")
            if md5 is not None and digest.hexdigest() != md5:
                raise DownloadError("md5-mismatch", f"md5 {digest.hexdigest()} != expected {md5}")

        # fsync happens inside fetch, so a failing disk reports as a DownloadError("io-error").
        atomic_write(dest, fetch, suffix=".part", fsync=False)


def _deadline_error(deadline: Deadline, detail: str) -> DownloadError:
    return DownloadError("deadline-exceeded", f"gave up after the per-file deadline of "
                                              f"{deadline.seconds:g} s ({detail})")


def _stall_error(window: float, min_rate: float, received: int) -> DownloadError:
    return DownloadError("stalled", f"less than {min_rate:g} bytes/s for {window:g} s "
                                    f"({received} bytes received)")


class _Slot:
    """Holds one of a file host's connection slots; waiting ends early when ``stop`` is set."""

    def __init__(self, slots: threading.BoundedSemaphore, stop: threading.Event | None) -> None:
        self._slots, self._stop = slots, stop

    def __enter__(self) -> None:
        while not self._slots.acquire(timeout=0.2):
            if self._stop is not None and self._stop.is_set():
                raise DownloadError("cancelled", "the fetch stopped before this download began")

    def __exit__(self, *exc: object) -> None:
        self._slots.release()


class _Tracked:
    """Keeps a running download's deadline in its client's set, so it can be cut."""

    def __init__(self, active: set[Deadline], lock: threading.Lock, deadline: Deadline) -> None:
        self._active, self._lock, self._deadline = active, lock, deadline

    def __enter__(self) -> None:
        with self._lock:
            self._active.add(self._deadline)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active.discard(self._deadline)
