from services.dispatcher.bootstrap import build
from services.kit.host import run

if __name__ == "__main__":
    run("dispatcher", build)
