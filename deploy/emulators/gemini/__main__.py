from deploy.emulators.gemini import __doc__ as description
from deploy.emulators.gemini.cli import main

main(description=description)
