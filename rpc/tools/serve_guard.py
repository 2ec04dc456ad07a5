"""What `layercast serve` checks before vLLM starts: where the admin token comes from, and no exposed
server without one.

The token, highest first: `--layercast-token TOKEN` (works, with a warning: every user of the machine
sees it in `ps`), `--layercast-token-file PATH` (or `[server] token_file`; the file's content, stripped),
`LAYERCAST_ADMIN_TOKEN`. A token on the command line together with a token file is an error. The token
then travels in the environment only (`LAYERCAST_ADMIN_TOKEN`, what the endpoint plugin reads).

Binding anything but a loopback address (127.0.0.0/8, ::1, `localhost`) without a token is refused
(`ServeRefused`: one line, exit 2) unless `--insecure` is given, which prints a loud warning at every
start. `--uds` (a Unix socket) counts as local.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rpc.tools.serve_settings import pop_option

TOKEN_ENV = "LAYERCAST_ADMIN_TOKEN"  # = inference_worker.http_plugin.TOKEN_ENV (not imported: no vLLM here)
DEFAULT_HOST = "127.0.0.1"  # what `inference_worker.serve` binds without --host
INSECURE_FLAG = "--insecure"


class ServeRefused(ValueError):
    """`layercast serve` must not start; the message says why and what to do, in one line."""


@dataclass
class Prepared:
    """The argv for `inference_worker.serve` (layercast's security flags removed), the environment to
    add (the token) and the warnings to print before vLLM starts."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name (or "" = every interface): reachable from elsewhere
        return False


def _last_value(argv: list[str], flag: str) -> str | None:
    """The value argparse would keep for `flag` (the last occurrence), without changing `argv`."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def read_token_file(path: str) -> tuple[str, str | None]:
    """(the token, a warning or None); `ServeRefused` when the file cannot serve as one."""
    p = Path(path).expanduser()
    try:
        token = p.read_text().strip()
        mode = p.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ServeRefused(f"cannot read the admin token file {p}: {why}") from exc
    if not token:
        raise ServeRefused(f"the admin token file {p} is empty")
    if any(c.isspace() for c in token):
        raise ServeRefused(f"the admin token file {p} must hold one token (no spaces or line breaks)")
    loose = None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        loose = (
            f"the admin token file {p} is readable by other users (mode {stat.filemode(mode)}): chmod 600 it"
        )
    return token, loose


def prepare(argv: list[str], environ: Mapping[str, str], token_on_command_line: bool = False) -> Prepared:
    """Resolve the token and check the bind address of `layercast serve ARGV` (after the settings were
    applied). `token_on_command_line`: the user typed `--layercast-token` (settings may have moved it
    into the environment already)."""
    argv = list(argv)
    insecure = False
    while INSECURE_FLAG in argv:
        argv.remove(INSECURE_FLAG)
        insecure = True
    flag_token = pop_option(argv, "--layercast-token")
    token_file = pop_option(argv, "--layercast-token-file")
    out = Prepared(argv)
    if flag_token is not None or token_on_command_line:
        if token_file is not None:
            raise ServeRefused(
                "give the admin token once: --layercast-token or --layercast-token-file, not both"
            )
        out.warnings.append(
            "--layercast-token puts the admin token on the command line, where every user of this machine "
            f"sees it (`ps`); use --layercast-token-file PATH or {TOKEN_ENV} instead"
        )
    token = flag_token or None
    if token is None and token_file is not None:
        token, loose = read_token_file(token_file)
        if loose:
            out.warnings.append(loose)
    token = token or environ.get(TOKEN_ENV) or None
    if token is not None:
        out.env[TOKEN_ENV] = token

    host = _last_value(argv, "--host") or DEFAULT_HOST
    exposed = not is_loopback(host) and _last_value(argv, "--uds") is None
    if exposed and token is None and not insecure:
        raise ServeRefused(
            f"refusing to serve on --host {host} (not a loopback address) without an admin token: anyone "
            "who reaches it could replace the model's weights; set it with --layercast-token-file PATH or "
            f"{TOKEN_ENV}, or pass {INSECURE_FLAG} to run without one"
        )
    if insecure and token is None:
        where = f"--host {host}" + (" (reachable from other machines)" if exposed else "")
        out.warnings.append(
            f"INSECURE ({INSECURE_FLAG}): no admin token; on {where} anyone who reaches this server can call "
            "/init_broadcaster, /update_weights and /check and replace the weights it serves"
        )
    elif insecure:
        out.warnings.append(f"{INSECURE_FLAG} has no effect: an admin token is set and required")
    return out


def apply(argv: list[str], token_on_command_line: bool = False) -> tuple[list[str], list[str]]:
    """`prepare` for this process: its token goes into `os.environ`; (argv, warnings)."""
    out = prepare(argv, os.environ, token_on_command_line)
    os.environ.update(out.env)
    return out.argv, out.warnings
