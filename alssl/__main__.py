from alssl.cli import main

main()
