from services.kit.host import run
from services.secrets.bootstrap import build

if __name__ == "__main__":
    run("secrets", build)
