from overfill_serve.cli import main

main()
