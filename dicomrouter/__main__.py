from dicomrouter.cli import main

main()
