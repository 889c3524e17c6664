# Shortcuts. The quick start needs none of this: `python3 infra/dev.py up|test`.
# Recipes other than `up`, `test` and `compose-up` use .venv, which infra/dev.py creates.

set positional-arguments

venv := ".venv/bin"

# list the recipes
default:
    @just --list

# the whole platform (NATS and PostgreSQL from wheels unless GATEHOUSE_*_URL are set)
up *args:
    python3 infra/dev.py up "$@"

# lint, format check, types, then every test (what CI runs); args go to pytest
test *args:
    python3 infra/dev.py test "$@"

# ruff lint and format check
lint:
    {{venv}}/ruff check .
    {{venv}}/ruff format --check .

# mypy with the configuration in pyproject.toml
typecheck:
    {{venv}}/mypy

# pure tests, no servers
unit *args:
    {{venv}}/pytest -m unit "$@"

# tests on real NATS JetStream and PostgreSQL
integration *args:
    {{venv}}/pytest -m integration "$@"

# `gatehouse up` driven over HTTP
e2e *args:
    {{venv}}/pytest -m e2e "$@"

# what authentication costs: GET /v1/me against GET /health (starts its own `gatehouse up`)
bench-auth *args:
    {{venv}}/python bench/auth.py "$@"

# the official MCP conformance suite against /servers/{name}/mcp (downloads Node 22 and the suite with npm)
conformance *args:
    {{venv}}/python infra/conformance.py "$@"

# what the MCP gateway adds to a tool call: upstream directly vs through /mcp (starts its own `gatehouse up`)
bench-mcp *args:
    {{venv}}/python bench/mcp_overhead.py "$@"

# NATS, PostgreSQL and the three services in containers (needs GATEHOUSE_KEY_PEPPER in .env)
compose-up *args:
    docker compose up --build "$@"
