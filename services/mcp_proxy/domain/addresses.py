"""Which upstream URLs mcp_proxy may connect to.

A registered URL is a request to make the gateway open connections on a user's behalf, so
URLs that reach into the gateway's own network are refused: loopback, private, link-local
(which includes the cloud metadata address 169.254.169.254), carrier-grade NAT, multicast
and reserved ranges, and well-known metadata host names. An operator allow-list
(GATEHOUSE_MCP_ALLOW_PRIVATE: host names, addresses or CIDRs) lets chosen ones through.
Host names are resolved and every address they resolve to is checked; the check runs at
registration and again whenever a connection to the upstream is opened (DNS may change).
"""

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import SplitResult, urlsplit

from services.mcp_proxy.domain.errors import Invalid

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)
SCHEMES = ("http", "https")


class AddressPolicy:
    """The operator's allow-list: exact host names, addresses, or networks in CIDR form."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in (a.strip() for a in allow):
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(item.lower().rstrip("."))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IP) -> bool:
        return any(address in network for network in self.networks)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def classify(address: IP) -> str | None:
    """Why an address is refused ("link-local or metadata", ...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_private:
        return "private"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "non-public"
    return None


def parse_url(url: str) -> SplitResult:
    if len(url) > 2048:
        raise Invalid("the url is longer than 2048 characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as err:
        raise Invalid(f"{url!r} is not a valid URL ({err})") from None
    if parts.scheme not in SCHEMES:
        raise Invalid(f"the url must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise Invalid(f"the url {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise Invalid(
            'the url must not carry credentials; put them in a header whose value is {"secret": "NAME"}'
        )
    return parts


def check_url(url: str, policy: AddressPolicy, resolve: Resolver = system_resolver) -> str:
    """Returns the url when every address it reaches is allowed; Invalid says why not."""
    parts = parse_url(url)
    host = str(parts.hostname)
    if policy.allows_host(host):
        return url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _addresses(url, host, port, resolve)
    for address in addresses:
        kind = classify(address)
        if kind is not None and not policy.allows_address(address):
            raise Invalid(_refusal(url, str(address), kind))
    return url


def _addresses(url: str, host: str, port: int, resolve: Resolver) -> list[IP]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    if host.lower().rstrip(".") in METADATA_HOSTS:
        raise Invalid(_refusal(url, host, "cloud metadata"))
    try:
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(host, port)]
    except (OSError, UnicodeError, ValueError) as err:
        raise Invalid(f"the host {host!r} of {url!r} cannot be resolved ({err})") from None
    if not addresses:
        raise Invalid(f"the host {host!r} of {url!r} resolves to no address")
    return addresses


def _refusal(url: str, where: str, kind: str) -> str:
    return (
        f"{url} points at a {kind} address ({where}); the gateway does not connect to such "
        "addresses unless the operator allows them (GATEHOUSE_MCP_ALLOW_PRIVATE)"
    )
