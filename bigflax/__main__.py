from bigflax.cli import main

main()
