from gdncheck.cli import main

main()
