from services.kit.host import run
from services.mcp_proxy.bootstrap import build

if __name__ == "__main__":
    run("mcp_proxy", build)
