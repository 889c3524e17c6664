from services.identity.bootstrap import build
from services.kit.host import run

if __name__ == "__main__":
    run("identity", build)
