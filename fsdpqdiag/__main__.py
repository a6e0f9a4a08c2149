from fsdpqdiag.cli import main

main()
