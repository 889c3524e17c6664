from services.kit.host import run
from services.quota.bootstrap import build

if __name__ == "__main__":
    run("quota", build)
