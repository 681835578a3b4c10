from bgtransfer.cli import main

main()
