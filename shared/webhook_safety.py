"""Where a user's webhook may point: public http(s) hosts only (no SSRF into our own network).

`webhook_url_problem` is checked when a job is submitted and again before every delivery (a name's
DNS answer can change in between); the notifier also refuses non-public addresses when aiohttp
resolves the name to connect, so a rebinding DNS answer cannot slip through between check and use.
"""

import ipaddress
import socket
from urllib.parse import urlsplit

from shared.errors import Unavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_HINT = "an operator can allow private addresses with BUNCH_ALLOW_PRIVATE_WEBHOOKS=1"

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnresolvableHost(Unavailable):
    """The host name has no address right now (may be temporary)."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: IPAddress) -> str | None:
    """What kind of non-public address this is, or None for a public (globally routable) one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "a scoped (link-local) address"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = address_problem(embedded)
            if inner is not None:
                return inner
    for name, flag in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a private", address.is_private),
        ("a reserved", address.is_reserved),
    ):
        if flag:
            return f"{name} address"
    if not address.is_global:  # shared (CGNAT 100.64/10), documentation, benchmarking ranges ...
        return "a non-public address"
    return None


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the name resolves to (blocking: call it in a thread from async code)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(str(exc)) from exc
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = _parse_ip(str(sockaddr[0]))
        if ip is not None and ip not in found:
            found.append(ip)
    if not found:
        raise UnresolvableHost("no address")
    return found


def check_webhook_url(url: str, allow_private: bool) -> tuple[str | None, bool]:
    """(problem or None, whether the problem may go away by itself, i.e. a DNS failure)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        return f"The webhook URL is not a valid URL ({exc}).", False
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"'{scheme}'" if scheme else "none"
        return f"The webhook URL must start with http:// or https:// (its scheme is {shown}).", False
    host = parts.hostname
    if not host:
        return "The webhook URL has no host name; give a full URL such as https://example.com/hooks/bunch.", False
    if allow_private:
        return None, False
    literal = _parse_ip(host)
    if literal is not None:
        kind = address_problem(literal)
        if kind is not None:
            return (
                f"The webhook URL points to {kind} ({literal}); webhooks can only be sent to public "
                f"internet hosts ({ALLOW_HINT}).",
                False,
            )
        return None, False
    try:
        addresses = resolve(host, port or (443 if scheme == "https" else 80))
    except UnresolvableHost:
        return f"The webhook host '{host}' could not be resolved; check the host name.", True
    for address in addresses:
        kind = address_problem(address)
        if kind is not None:
            return (
                f"The webhook host '{host}' resolves to {kind} ({address}); webhooks can only be sent to "
                f"public internet hosts ({ALLOW_HINT}).",
                False,
            )
    return None, False


def webhook_url_problem(url: str, allow_private: bool) -> str | None:
    """None if the URL may receive webhooks; else a message saying what to change.

    Only http and https, with a host; unless `allow_private`, the host must not be, or resolve to,
    a private, loopback, link-local, multicast, reserved or unspecified address (IPv4 or IPv6,
    including IPv6 forms that embed an IPv4 address). Resolving uses DNS: call it in a thread
    (`asyncio.to_thread`) from async code.
    """
    problem, _transient = check_webhook_url(url, allow_private)
    return problem
