from attnops.cli.maps import main

if __name__ == "__main__":
    raise SystemExit(main())
