// Knock's own React feed components, pointed at herald. Everything the page
// needs comes from its query string, so one build serves every test:
//   ?host=http://127.0.0.1:8080&key=pk_...&token=<user JWT>&user=u1&feed=<channel uid>
import React, { useRef, useState } from "react";
import { createRoot } from "react-dom/client";
import { KnockFeedProvider, KnockProvider, NotificationFeedPopover, NotificationIconButton } from "@knocklabs/react";
import "@knocklabs/react/dist/index.css";

const params = new URLSearchParams(window.location.search);
const config = {
  host: params.get("host"),
  apiKey: params.get("key"),
  userToken: params.get("token") || undefined,
  userId: params.get("user"),
  feedId: params.get("feed"),
};
// What the bell counts: Knock's default is "unseen"; the test watches "unread".
const badgeCountType = params.get("badge") || "unread";

function Feed() {
  const [isVisible, setIsVisible] = useState(false);
  const buttonRef = useRef(null);
  return (
    <>
      <NotificationIconButton ref={buttonRef} badgeCountType={badgeCountType} onClick={() => setIsVisible(!isVisible)} />
      <NotificationFeedPopover
        buttonRef={buttonRef}
        isVisible={isVisible}
        onClose={() => setIsVisible(false)}
        // A click marks the item interacted (Knock's cell does that itself); record it instead of following action_url off the page.
        onNotificationClick={(item) => {
          window.heraldClicked = [...(window.heraldClicked || []), item.id];
        }}
      />
    </>
  );
}

function App() {
  const missing = Object.entries(config).filter(([k, v]) => !v && k !== "userToken").map(([k]) => k);
  if (missing.length > 0) {
    return <p id="config-error">missing query parameters: {missing.join(", ")}</p>;
  }
  return (
    <KnockProvider apiKey={config.apiKey} host={config.host} user={{ id: config.userId }} userToken={config.userToken} logLevel="debug">
      <KnockFeedProvider feedId={config.feedId}>
        <header style={{ display: "flex", justifyContent: "flex-end", padding: 16 }}>
          <Feed />
        </header>
      </KnockFeedProvider>
    </KnockProvider>
  );
}

createRoot(document.getElementById("root")).render(<App />);
