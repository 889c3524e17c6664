from services.kit.host import run
from services.session_runner.bootstrap import build

if __name__ == "__main__":
    run("session_runner", build)
