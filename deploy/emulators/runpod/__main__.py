from deploy.emulators.runpod.cli import main

main()
