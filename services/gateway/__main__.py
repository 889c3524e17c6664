from services.gateway.bootstrap import main

if __name__ == "__main__":
    main()
